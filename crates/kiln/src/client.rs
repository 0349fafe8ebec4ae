//! Talking to the dispatcher as a client: loading a certificate bundle,
//! connecting, and the admin requests `kiln results`, `kiln cancel` and
//! `kiln demo` make.

use anyhow::{Context, bail};
use kiln_net::{Bundle, NetConfig, RequestError};
use kiln_proto::wire::{Reply, Request};
use kiln_proto::{CommitId, CommitPrefix, CommitReport};

use crate::cli::ClientArgs;

/// Loads the certificate bundle in `dir`, saying how to make one if it cannot.
pub fn load_bundle(dir: &std::path::Path) -> anyhow::Result<Bundle> {
    Bundle::load(dir).with_context(|| {
        format!(
            "cannot load the certificate bundle in {} (make one with `kiln certs init` or `kiln certs issue`)",
            dir.display()
        )
    })
}

/// The transport settings the client flags ask for.
pub fn net(client: &ClientArgs) -> NetConfig {
    NetConfig::with_idle_timeout(client.idle_timeout)
}

/// Sends one admin request and returns the dispatcher's reply; `what` names
/// the request for an error ("get results from …").
pub async fn admin_request(
    bundle: &Bundle,
    client: &ClientArgs,
    request: &Request,
    what: impl FnOnce() -> String,
) -> anyhow::Result<Reply> {
    let conn = admin_connect(bundle, client).await?;
    let reply = admin_call(&conn, request, what).await;
    conn.close(kiln_net::CloseCode::Shutdown, "done");
    reply
}

/// Sends one request on an admin connection the caller keeps open.
async fn admin_call(
    conn: &kiln_net::Connection,
    request: &Request,
    what: impl FnOnce() -> String,
) -> anyhow::Result<Reply> {
    match conn.request(request).await {
        Ok((_, _, reply)) => Ok(reply),
        Err(RequestError::Refused(reason)) => bail!("the dispatcher refused: {reason}"),
        // A refused certificate reads the same whether it showed at the handshake or here.
        Err(RequestError::Rejected(reason)) => bail!("{reason}"),
        Err(e) => Err(anyhow::Error::from(e).context(format!("cannot {}", what()))),
    }
}

/// Fetches a commit's report as an admin.
pub async fn fetch_report(
    bundle: &Bundle,
    client: &ClientArgs,
    commit: Option<CommitId>,
) -> anyhow::Result<Option<CommitReport>> {
    let conn = admin_connect(bundle, client).await?;
    let report = fetch_report_on(&conn, client, commit).await;
    conn.close(kiln_net::CloseCode::Shutdown, "done");
    report
}

/// Fetches a commit's report on an admin connection the caller keeps open,
/// so that a caller who asks again and again (the demo, waiting) does not
/// make the dispatcher log a connection for every question.
pub async fn fetch_report_on(
    conn: &kiln_net::Connection,
    client: &ClientArgs,
    commit: Option<CommitId>,
) -> anyhow::Result<Option<CommitReport>> {
    let what = || format!("get results from {}", client.dispatcher);
    match admin_call(conn, &Request::GetResults { commit }, what).await? {
        Reply::Report(report) => Ok(report.map(|r| *r)),
        other => bail!("unexpected reply from the dispatcher: {other:?}"),
    }
}

/// Opens an admin connection to the dispatcher named by `client`.
pub async fn admin_connect(bundle: &Bundle, client: &ClientArgs) -> anyhow::Result<kiln_net::Connection> {
    Ok(kiln_net::connect(bundle, &client.dispatcher, net(client)).await?)
}

/// The commit a person named: all 40 digits as typed, or else the one commit
/// the dispatcher knows whose id starts with the digits typed (at least 7, as git).
pub async fn resolve_commit(bundle: &Bundle, client: &ClientArgs, typed: &str) -> anyhow::Result<CommitId> {
    let prefix: CommitPrefix = typed.parse()?;
    if let Some(full) = prefix.full() {
        return Ok(full);
    }
    let what = || format!("look up commit {prefix} at {}", client.dispatcher);
    match admin_request(bundle, client, &Request::Resolve { prefix: prefix.clone() }, what).await? {
        Reply::Resolved(found) => pick_commit(&prefix, &found),
        other => bail!("unexpected reply from the dispatcher: {other:?}"),
    }
}

/// The one commit of `found` (the dispatcher's matches for `prefix`), or why there is none.
fn pick_commit(prefix: &CommitPrefix, found: &[CommitId]) -> anyhow::Result<CommitId> {
    match found {
        [] => bail!("the dispatcher knows no commit starting with {prefix}"),
        [one] => Ok(*one),
        many => {
            let list: Vec<&str> = many.iter().map(CommitId::as_str).collect();
            let more = if many.len() >= kiln_proto::wire::MAX_RESOLVED { ", …" } else { "" };
            bail!("{prefix} is ambiguous: it starts {}{more}; type more digits", list.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(c: char) -> CommitId {
        c.to_string().repeat(40).parse().unwrap()
    }

    #[test]
    fn a_prefix_picks_its_one_commit_or_says_why_not() {
        let prefix: CommitPrefix = "aaaaaaa".parse().unwrap();
        assert_eq!(pick_commit(&prefix, &[id('a')]).unwrap(), id('a'));
        let none = pick_commit(&prefix, &[]).unwrap_err().to_string();
        assert_eq!(none, "the dispatcher knows no commit starting with aaaaaaa");
        let two = pick_commit(&prefix, &[id('a'), id('b')]).unwrap_err().to_string();
        assert!(two.contains("aaaaaaa is ambiguous") && two.contains(id('a').as_str()), "{two}");
        assert!(two.contains(id('b').as_str()) && !two.contains('…'), "{two}");
        let many = vec![id('c'); kiln_proto::wire::MAX_RESOLVED];
        assert!(pick_commit(&prefix, &many).unwrap_err().to_string().contains(", …;"));
    }
}
