//! Holder labels (`label`, an extension of the multiplexed protocol): the
//! holder proclaims one, `stats` shows it with the fence, a snapshot keeps
//! it, and it goes with the hold.

use std::time::Duration;

use dflockd_core::{
    AcquireOutcome, Command, ConnId, LockError, LockTable, Op, Outcome, ResourceId, Salt,
    TableConfig,
};
use dflockd_proto::{Key, Label, Limit, Namespace, Token};

fn at(secs: u64, op: Op) -> Command {
    Command::new(Duration::from_secs(secs), Salt::new(secs, 3), op)
}

fn leader_key() -> ResourceId {
    ResourceId::new(Namespace::Lock, Key::new("svc/leader").unwrap())
}

fn label(token: Token, text: &str) -> Op {
    Op::Label {
        resource: leader_key(),
        token,
        label: Label::new(text).unwrap(),
    }
}

#[test]
fn a_label_is_shown_kept_in_snapshots_and_gone_with_the_hold() {
    let mut table = LockTable::new(TableConfig::default());
    let acquire = Op::Acquire {
        conn: ConnId(1),
        resource: leader_key(),
        limit: Limit::ONE,
        lease: None,
        wait: None,
        origin: None,
    };
    let Ok(Outcome::Acquire(AcquireOutcome::Granted(grant))) =
        table.apply(&at(0, acquire.clone())).outcome
    else {
        panic!("granted");
    };
    // Only the holder's token may proclaim.
    let stranger = Token::new(grant.token.fence() + 1, 0);
    assert_eq!(
        table.apply(&at(1, label(stranger, "intruder"))).outcome,
        Err(LockError::NotHeld)
    );
    assert_eq!(
        table
            .apply(&at(1, label(grant.token, "node-a:8080")))
            .outcome,
        Ok(Outcome::Labelled)
    );
    let entry = |table: &LockTable| table.stats(0, Duration::from_secs(2)).locks;
    let shown = entry(&table);
    assert_eq!(shown[0].fence, Some(grant.token.fence()));
    assert_eq!(shown[0].label.as_deref(), Some("node-a:8080"));
    // A replica restored from a snapshot shows the same.
    let restored = LockTable::restore(&table.snapshot()).unwrap();
    assert_eq!(restored.snapshot(), table.snapshot());
    assert_eq!(restored.stats(0, Duration::from_secs(2)).locks, shown);
    // Released: the next holder starts unlabelled.
    let release = Op::Release {
        resource: leader_key(),
        token: grant.token,
    };
    assert_eq!(table.apply(&at(3, release)).outcome, Ok(Outcome::Released));
    let _ = table.apply(&at(4, acquire));
    let next = entry(&table);
    assert!(next[0].fence > Some(grant.token.fence()));
    assert_eq!(next[0].label, None);
}
