//! Renew requests as they travel over a lane: the supervisor encodes a
//! batch per server, the lane writes it and hands each reply back, tagged
//! with the lease it belongs to. Below the lanes and the supervisor both.

use dflockd_proto::Reply;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::Error;
use crate::lane_id::LaneId;

/// Identity of one tracked lease; never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct LeaseId(pub(crate) u64);

/// Where the lanes hand renew replies: every reply read at once, together.
pub(crate) type RenewSink = mpsc::UnboundedSender<Vec<RenewReply>>;

/// Identifies one renew request in flight, to match its reply.
pub(crate) struct RenewTag {
    pub(crate) id: LeaseId,
    pub(crate) batch: u32,
    pub(crate) sent_at: Instant,
}

impl RenewTag {
    /// Pairs the tag with the outcome of its request.
    pub(crate) fn reply(self, result: Result<Reply, Error>) -> RenewReply {
        RenewReply {
            id: self.id,
            batch: self.batch,
            sent_at: self.sent_at,
            lane: None,
            result,
        }
    }

    /// Pairs the tag with the reply that came back on `lane`.
    pub(crate) fn reply_on(self, lane: LaneId, reply: Reply) -> RenewReply {
        RenewReply {
            lane: Some(lane),
            ..self.reply(Ok(reply))
        }
    }
}

/// Result of a renew request.
pub(crate) struct RenewReply {
    pub(crate) id: LeaseId,
    pub(crate) batch: u32,
    pub(crate) sent_at: Instant,
    /// The lane that answered, if one did.
    pub(crate) lane: Option<LaneId>,
    pub(crate) result: Result<Reply, Error>,
}

/// Renew requests for one server, encoded back to back, with a tag per
/// request in the same order and the sink for their replies.
pub(crate) struct RenewBatch {
    pub(crate) wire: Vec<u8>,
    pub(crate) tags: Vec<RenewTag>,
    sink: RenewSink,
}

impl RenewBatch {
    pub(crate) fn new(sink: RenewSink) -> RenewBatch {
        RenewBatch {
            wire: Vec::new(),
            tags: Vec::new(),
            sink,
        }
    }

    pub(crate) fn into_parts(self) -> (Vec<u8>, Vec<RenewTag>, RenewSink) {
        (self.wire, self.tags, self.sink)
    }

    /// None of these requests will be answered.
    pub(crate) fn fail(self, error: Error) {
        let replies = self
            .tags
            .into_iter()
            .map(|tag| tag.reply(Err(error.clone())))
            .collect();
        let _ = self.sink.send(replies);
    }
}
