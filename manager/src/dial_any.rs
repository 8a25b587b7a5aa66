//! Dialing one server known by several endpoints (several proxies, several
//! addresses): race them, happy-eyeballs style.

use std::sync::Arc;
use std::time::Duration;

use flow::auth::PeerAuthorizer;
use flow::conn::Flow;
use flow::naming::Endpoint;
use flow::{Error, ErrorKind, Result};
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use crate::manager::Manager;

/// Delay before the next endpoint is tried while earlier ones are pending.
pub const HAPPY_EYEBALLS_STAGGER: Duration = Duration::from_millis(250);

impl Manager {
    /// A flow to the server reachable at any of `endpoints`: dials the first,
    /// starts the next after [`HAPPY_EYEBALLS_STAGGER`] (at once if one
    /// fails), keeps the first that succeeds and drops the rest.
    pub async fn dial_any(
        &self,
        endpoints: &[Endpoint],
        authorizer: Arc<dyn PeerAuthorizer>,
        channel_timeout: Duration,
    ) -> Result<Flow> {
        if endpoints.is_empty() {
            return Err(Error::bad_arg("no endpoint to dial"));
        }
        let mut pending = FuturesUnordered::new();
        let mut next = 0;
        let mut last_err = None;
        let start = |i: usize| {
            let manager = self.clone();
            let ep = endpoints[i].clone();
            let auth = authorizer.clone();
            async move { manager.dial(&ep, auth, channel_timeout).await }
        };
        pending.push(start(next));
        next += 1;
        loop {
            let stagger = tokio::time::sleep(HAPPY_EYEBALLS_STAGGER);
            tokio::select! {
                result = pending.next() => match result {
                    Some(Ok(flow)) => return Ok(flow),
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "one endpoint failed; trying the next");
                        last_err = Some(e);
                        if next < endpoints.len() {
                            pending.push(start(next));
                            next += 1;
                        } else if pending.is_empty() {
                            break;
                        }
                    }
                    None => break,
                },
                _ = stagger, if next < endpoints.len() => {
                    pending.push(start(next));
                    next += 1;
                }
            }
        }
        Err(last_err.unwrap_or_else(|| Error::new(ErrorKind::DialFailed, "every endpoint failed")))
    }
}
