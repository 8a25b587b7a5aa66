//! Control flows: a server or downstream proxy registers, is given the
//! proxy's endpoints, hears of changes, and stays registered while the flow
//! is open.

use std::sync::Arc;

use flow::Result;
use flow::conn::{Flow, FlowWriter};
use flow::message::{Message, ProxyErrorResponse, ProxyResponse};

use super::route::{Kind, endpoints_for};
use super::{Inner, Refusal, Refused};
use crate::control_wire::send;

/// Serves one control flow until the registration ends.
pub(super) async fn serve(inner: Arc<Inner>, flow: Flow, kind: Kind) {
    let conn = flow.conn().clone();
    if let Err(e) = flow.disable_fragmentation() {
        tracing::debug!(error = %e, "control flow closed before it could be answered");
        return;
    }
    let (mut reader, mut writer) = flow.into_split();
    let registration = match inner.claim(&conn, kind) {
        Ok(r) => r,
        Err(refused) => {
            inner.refused(&conn, &refused);
            let _ = send_error(&mut writer, &refused.to_string()).await;
            writer.close_write();
            return;
        }
    };
    let names = conn.remote_blessings().names();
    tracing::info!(
        peer = %conn.remote_addr(),
        rid = %registration.rid,
        ?kind,
        ?names,
        "registered"
    );
    let mut endpoints = inner.endpoints.subscribe();
    let mut ended = registration.ended();
    let mut stopping = inner.stopping.subscribe();
    let mut outcome = {
        let own = endpoints.borrow_and_update().clone();
        send_endpoints(&mut writer, &own, kind, registration.rid, &names).await
    };
    while outcome.is_ok() {
        tokio::select! {
            biased;
            () = super::until_set(&mut stopping) => {
                let reason = Refused::new(Refusal::ShuttingDown, "the proxy is shutting down");
                let _ = send_error(&mut writer, &reason.to_string()).await;
                break;
            }
            reason = ended_with(&mut ended) => {
                if let Some(reason) = reason {
                    let _ = send_error(&mut writer, &reason).await;
                }
                break;
            }
            _ = conn.closed() => break,
            msg = reader.read_msg() => match msg {
                // Registrants have nothing more to say; what they send is
                // read (so it does not hold credit) and ignored.
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            },
            changed = endpoints.changed() => {
                if changed.is_err() {
                    break;
                }
                let own = endpoints.borrow_and_update().clone();
                outcome = send_endpoints(&mut writer, &own, kind, registration.rid, &names).await;
            }
        }
    }
    if let Err(e) = outcome {
        tracing::debug!(rid = %registration.rid, error = %e, "control flow failed");
    }
    writer.close_write();
    inner
        .registry
        .lock()
        .unregister(registration.rid, registration.id);
    tracing::info!(rid = %registration.rid, "registration ended");
}

/// The reason a registration was ended with (`None` if the sender went).
async fn ended_with(ended: &mut tokio::sync::watch::Receiver<Option<String>>) -> Option<String> {
    ended
        .wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|r| r.clone())
}

async fn send_endpoints(
    writer: &mut FlowWriter,
    own: &[flow::naming::Endpoint],
    kind: Kind,
    rid: flow::naming::RoutingId,
    names: &[String],
) -> Result<()> {
    let endpoints = endpoints_for(own, kind, rid, names)
        .iter()
        .map(ToString::to_string)
        .collect();
    send(writer, &Message::ProxyResponse(ProxyResponse { endpoints })).await
}

async fn send_error(writer: &mut FlowWriter, error: &str) -> Result<()> {
    send(
        writer,
        &Message::ProxyErrorResponse(ProxyErrorResponse {
            error: error.to_string(),
        }),
    )
    .await
}
