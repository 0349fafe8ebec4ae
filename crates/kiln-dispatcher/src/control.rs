//! Who may ask the dispatcher for what, and the actions a reader other than
//! a QUIC peer (the dashboard) may take on a caller's behalf.
//!
//! [`authorize`] is the one table of roles: the QUIC server checks every
//! request against it, and so does [`Actions`], so an action taken over
//! HTTPS needs exactly the role it needs over QUIC. [`Actions::cancel`] goes
//! through the same owner-task path as `kiln cancel`
//! (`Dispatcher::cancel`): one definition of what cancelling is.
//!
//! [`Actions`] holds the dispatcher weakly, like the read API, so a page
//! still open at shutdown keeps nothing alive.

use std::sync::{Arc, Weak};

use kiln_net::PeerIdentity;
use kiln_proto::CommitId;
use kiln_proto::Role;
use kiln_proto::wire::Request;

use crate::server::Dispatcher;

/// What a peer asks for, by kind: the table is by kind so that a caller
/// can be checked before it names anything (the dashboard checks its
/// caller before it looks a commit up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[expect(missing_docs, reason = "each names the request it stands for")]
pub enum Action {
    Register,
    Resume,
    FetchSource,
    Submit,
    BranchTip,
    ReadResults,
    Cancel,
    Resolve,
    Status,
}

impl Action {
    /// The kind of `request`.
    pub fn of(request: &Request) -> Action {
        match request {
            Request::Register(_) => Action::Register,
            Request::Resume(_) => Action::Resume,
            Request::FetchSource { .. } => Action::FetchSource,
            Request::Submit { .. } => Action::Submit,
            Request::BranchTip { .. } => Action::BranchTip,
            Request::GetResults { .. } | Request::History { .. } | Request::Flaky { .. } => Action::ReadResults,
            Request::Cancel { .. } => Action::Cancel,
            Request::Resolve { .. } => Action::Resolve,
            Request::Status { .. } => Action::Status,
        }
    }

    /// The role it needs, and what it does in words (for the refusal).
    fn needs(self) -> (Role, &'static str) {
        match self {
            Action::Register => (Role::Runner, "register as a runner"),
            Action::Resume => (Role::Runner, "resume jobs"),
            Action::FetchSource => (Role::Runner, "fetch source"),
            Action::Submit => (Role::Observer, "submit commits"),
            Action::BranchTip => (Role::Observer, "ask for branch tips"),
            Action::ReadResults => (Role::Admin, "read results"),
            Action::Cancel => (Role::Admin, "cancel commits"),
            Action::Resolve => (Role::Admin, "look up commits"),
            Action::Status => (Role::Admin, "read the dispatcher's status"),
        }
    }
}

/// Whether `peer` may do `action`; the refusal names the peer, what it
/// asked and the role that needs.
pub fn authorize(peer: &PeerIdentity, action: Action) -> Result<(), String> {
    let (allowed, what) = action.needs();
    if peer.role == allowed { Ok(()) } else { Err(format!("{peer} may not {what}: that needs the {allowed} role")) }
}

/// A cancellation that was carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cancelled {
    /// Whether anything was stopped (`false`: the commit had ended already).
    pub stopped: bool,
    /// The last update the dispatcher had published once it answered: a
    /// reader of the stream of changes that has applied this one shows the
    /// commit's new status.
    pub seq: u64,
}

/// Why a cancellation was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// The caller's role may not cancel (the text names the caller and the role).
    #[error("{0}")]
    NotAllowed(String),
    /// The dispatcher could not do it: it is stopping, or could not store the change.
    #[error("{0}")]
    Failed(String),
}

/// Actions on the dispatcher for callers identified by their certificates.
/// Cheap to clone.
#[derive(Clone)]
pub struct Actions {
    dispatcher: Weak<Dispatcher>,
}

impl std::fmt::Debug for Actions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Actions").finish_non_exhaustive()
    }
}

impl Actions {
    pub(crate) fn new(dispatcher: &Arc<Dispatcher>) -> Actions {
        Actions { dispatcher: Arc::downgrade(dispatcher) }
    }

    /// Cancels `commit` for `by`, as `kiln cancel` does: queued work is
    /// dropped, running tests are stopped, and the commit ends `cancelled`.
    pub async fn cancel(&self, commit: CommitId, by: &PeerIdentity) -> Result<Cancelled, CancelError> {
        authorize(by, Action::Cancel).map_err(CancelError::NotAllowed)?;
        let dispatcher =
            self.dispatcher.upgrade().ok_or_else(|| CancelError::Failed("the dispatcher is stopping".to_owned()))?;
        let stopped = dispatcher.cancel(commit, by).await.map_err(CancelError::Failed)?;
        Ok(Cancelled { stopped, seq: dispatcher.published_seq() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(role: Role) -> PeerIdentity {
        PeerIdentity { role, name: "p1".into() }
    }

    #[test]
    fn each_request_needs_its_one_role() {
        let commit: CommitId = "0123456789abcdef0123456789abcdef01234567".parse().unwrap();
        let cancel = Action::of(&Request::Cancel { commit });
        assert_eq!(cancel, Action::Cancel);
        assert_eq!(authorize(&peer(Role::Admin), cancel), Ok(()));
        assert_eq!(
            authorize(&peer(Role::Runner), cancel),
            Err("runner p1 may not cancel commits: that needs the admin role".to_owned())
        );
        assert_eq!(
            authorize(&peer(Role::Observer), cancel),
            Err("observer p1 may not cancel commits: that needs the admin role".to_owned())
        );
        let results = Action::of(&Request::GetResults { commit: None });
        assert!(authorize(&peer(Role::Runner), results).is_err());
        assert_eq!(authorize(&peer(Role::Admin), results), Ok(()));
    }
}
