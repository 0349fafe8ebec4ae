//! [`HostEvent`]: what a plugin run produces, as the runner sees it. Its
//! own module because both the host (which synthesizes some) and the
//! plugins' store (which forwards what a plugin reports) send them.

use kiln_proto::TestResult;

/// What [`crate::PluginHost::run`] sends while it runs, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostEvent {
    /// One test's result, as soon as the plugin reports it (or as the host
    /// makes it up for a file whose plugin failed).
    Test(TestResult),
    /// Every result of this file (repository-relative path, as given to
    /// `run`) has been sent, including the `error` results the host
    /// synthesizes when the plugin fails on it. Sent once for each file a
    /// plugin claims; files no plugin claims (and invalid or repeated paths)
    /// get no event.
    FileDone(String),
    /// Every file given so far is done, and the plugin waits for more
    /// ([`crate::PluginHost::run_with`]).
    Idle,
}
