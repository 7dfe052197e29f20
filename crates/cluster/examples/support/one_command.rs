//! The entry the storage examples write: one acquire of its own key.

use dflockd_cluster::{Batch, Entry};
use dflockd_core::{Command, ConnId, Op, ResourceId, Salt};
use dflockd_proto::{Key, Limit, Namespace};
use openraft::{CommittedLeaderId, EntryPayload, LogId};

/// Entry `index` of term 1: a batch of one acquire of `job-<index>`.
pub fn one_command_entry(index: u64) -> Result<Entry, Box<dyn std::error::Error>> {
    let at = |op| Command::new(std::time::Duration::ZERO, Salt::new(index, index), op);
    Ok(Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Batch {
            proposer: 1 << 32,
            office: at(Op::TakeOffice),
            commands: vec![at(Op::Acquire {
                conn: ConnId(index),
                resource: ResourceId::new(Namespace::Lock, Key::new(&format!("job-{index}"))?),
                limit: Limit::ONE,
                lease: None,
                wait: None,
                origin: None,
            })],
        }),
    })
}
