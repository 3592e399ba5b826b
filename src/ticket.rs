//! Join tickets: the mesh key plus addresses of peers to bootstrap from, as one copyable string
//! (`cmesh1` followed by base32 of a CBOR map).

use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::datadir::{MeshKey, MESH_KEY_LEN};
use crate::secret::Secret;

const PREFIX: &str = "cmesh1";
const MAX_TICKET_LEN: usize = 8 * 1024;
/// Most peer addresses a ticket carries.
pub const MAX_TICKET_ADDRS: usize = 16;

/// A decoded join ticket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// Pre-shared mesh key.
    pub mesh_key: MeshKey,
    /// Peer addresses, each ending in `/p2p/<peer id>`.
    pub addrs: Vec<Multiaddr>,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    k: Vec<u8>,
    a: Vec<String>,
}

/// Why a ticket was refused.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid join ticket: {0}; copy it again from `codex-mesh ticket` on a member node")]
pub struct TicketError(String);

impl Ticket {
    /// The textual form.
    pub fn encode(&self) -> String {
        let wire = Wire {
            k: self.mesh_key.expose().to_vec(),
            a: self.addrs.iter().map(|a| a.to_string()).collect(),
        };
        let mut bytes = Vec::new();
        let _ = ciborium::into_writer(&wire, &mut bytes);
        format!(
            "{PREFIX}{}",
            data_encoding::BASE32_NOPAD.encode(&bytes).to_lowercase()
        )
    }

    /// Parse and validate a ticket.
    pub fn decode(text: &str) -> Result<Ticket, TicketError> {
        let text = text.trim();
        if text.len() > MAX_TICKET_LEN {
            return Err(TicketError("too long".into()));
        }
        let body = text
            .strip_prefix(PREFIX)
            .ok_or_else(|| TicketError(format!("it does not start with {PREFIX:?}")))?;
        let bytes = data_encoding::BASE32_NOPAD
            .decode(body.to_uppercase().as_bytes())
            .map_err(|_| TicketError("it is not valid base32 (truncated?)".into()))?;
        let wire: Wire = ciborium::from_reader(bytes.as_slice())
            .map_err(|_| TicketError("its contents are malformed".into()))?;
        let mesh_key: [u8; MESH_KEY_LEN] = wire
            .k
            .try_into()
            .map_err(|_| TicketError("the mesh key has the wrong length".into()))?;
        if wire.a.is_empty() || wire.a.len() > MAX_TICKET_ADDRS {
            return Err(TicketError(format!(
                "it must list 1 to {MAX_TICKET_ADDRS} peer addresses"
            )));
        }
        let addrs = wire
            .a
            .iter()
            .map(|a| parse_peer_addr(a).map_err(TicketError))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Ticket {
            mesh_key: Secret::new(mesh_key),
            addrs,
        })
    }
}

/// Parse a multiaddress that must end in `/p2p/<peer id>`.
pub fn parse_peer_addr(text: &str) -> Result<Multiaddr, String> {
    let addr: Multiaddr = text
        .parse()
        .map_err(|_| format!("{text:?} is not a multiaddress"))?;
    match addr.iter().last() {
        Some(Protocol::P2p(_)) => Ok(addr),
        _ => Err(format!("{text:?} does not end in /p2p/<peer id>")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Ticket {
        let peer = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        Ticket {
            mesh_key: Secret::new([9; MESH_KEY_LEN]),
            addrs: vec![format!("/ip4/127.0.0.1/tcp/4001/p2p/{peer}")
                .parse()
                .unwrap()],
        }
    }

    #[test]
    fn round_trips() {
        let ticket = sample();
        assert_eq!(Ticket::decode(&ticket.encode()), Ok(ticket));
    }

    #[test]
    fn debug_output_hides_the_mesh_key() {
        let shown = format!("{:?}", sample());
        assert!(shown.contains("[redacted]"), "{shown}");
        assert!(!shown.contains("9, 9"), "{shown}");
    }

    #[test]
    fn garbage_and_truncation_are_refused_with_a_reason() {
        let text = sample().encode();
        assert!(Ticket::decode("hello")
            .unwrap_err()
            .to_string()
            .contains("invalid join ticket"));
        assert!(Ticket::decode(&text[..text.len() / 2]).is_err());
    }

    proptest! {
        #[test]
        fn decoding_never_panics(text in "cmesh1[a-z2-7]{0,200}") {
            let _ = Ticket::decode(&text);
        }
    }
}
