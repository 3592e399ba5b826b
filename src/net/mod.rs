//! The libp2p peer. One [`EventLoop`] task owns the `Swarm`; the rest of the program talks to
//! it through the cloneable [`Client`] and receives [`Event`]s from a channel.
//!
//! Transport: TCP, then the private-network handshake with the mesh key (a peer without the
//! key cannot even start noise), then noise, then yamux.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::upgrade::Version;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    gossipsub, identify, identity, noise, ping, tcp, yamux, Multiaddr, PeerId, StreamProtocol,
    Swarm, Transport,
};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::wire::{Request, Response, RPC_PROTOCOL, STATE_TOPIC};

/// Network start-up failures.
#[derive(Debug, Error)]
pub enum NetError {
    /// The swarm could not be built.
    #[error("cannot build the network stack: {0}")]
    Build(String),
    /// The listen address was refused.
    #[error("cannot listen on {addr}: {reason}; choose another with --listen")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    gossipsub: gossipsub::Behaviour,
    rpc: request_response::cbor::Behaviour<Request, Response>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

/// Something that happened on the network.
#[derive(Debug)]
pub enum Event {
    /// We listen on a new address.
    Listening(Multiaddr),
    /// First connection to a peer opened.
    Connected {
        /// The peer.
        peer: PeerId,
        /// The address of the connection as seen from here.
        addr: Multiaddr,
    },
    /// Last connection to a peer closed.
    Disconnected(PeerId),
    /// A gossip message arrived.
    Gossip {
        /// The original author (messages are signed).
        source: PeerId,
        /// The payload.
        data: Vec<u8>,
    },
    /// A request arrived; answer it with [`Client::respond`].
    Request {
        /// The sender.
        peer: PeerId,
        /// The request.
        request: Request,
        /// Where the answer goes.
        channel: ResponseChannel<Response>,
    },
    /// A peer told us the addresses it listens on.
    PeerAddrs {
        /// The peer.
        peer: PeerId,
        /// Its listen addresses.
        addrs: Vec<Multiaddr>,
    },
}

enum Command {
    Publish(Vec<u8>),
    Request {
        peer: PeerId,
        request: Request,
        reply: oneshot::Sender<Result<Response, String>>,
    },
    Respond {
        channel: ResponseChannel<Response>,
        response: Response,
    },
    Dial {
        peer: Option<PeerId>,
        addrs: Vec<Multiaddr>,
    },
    Disconnect(PeerId),
}

/// Handle to the network task.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::UnboundedSender<Command>,
}

impl Client {
    /// Publish on the state topic (best effort).
    pub fn publish(&self, data: Vec<u8>) {
        let _ = self.commands.send(Command::Publish(data));
    }

    /// Send a request; the answer (or failure) arrives on the returned receiver.
    pub fn request(
        &self,
        peer: PeerId,
        request: Request,
    ) -> oneshot::Receiver<Result<Response, String>> {
        let (reply, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Request {
            peer,
            request,
            reply,
        });
        rx
    }

    /// Answer an inbound request.
    pub fn respond(&self, channel: ResponseChannel<Response>, response: Response) {
        let _ = self.commands.send(Command::Respond { channel, response });
    }

    /// Dial a peer (by id, with candidate addresses) or a bare address.
    pub fn dial(&self, peer: Option<PeerId>, addrs: Vec<Multiaddr>) {
        let _ = self.commands.send(Command::Dial { peer, addrs });
    }

    /// Close every connection to a peer.
    pub fn disconnect(&self, peer: PeerId) {
        let _ = self.commands.send(Command::Disconnect(peer));
    }
}

/// Owns the swarm and runs it.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<Event>,
    pending: HashMap<OutboundRequestId, oneshot::Sender<Result<Response, String>>>,
    topic: gossipsub::IdentTopic,
    metrics: Arc<Metrics>,
}

/// Build the network: returns the client, the event receiver and the loop to spawn.
pub fn build(
    keypair: identity::Keypair,
    mesh_key: [u8; 32],
    listen: &Multiaddr,
    metrics: Arc<Metrics>,
) -> Result<(Client, mpsc::UnboundedReceiver<Event>, EventLoop), NetError> {
    let psk = PreSharedKey::new(mesh_key);
    let build_err = |e: &dyn std::fmt::Display| NetError::Build(e.to_string());
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(
            |key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                let noise = noise::Config::new(key)?;
                Ok(
                    tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                        .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                        .upgrade(Version::V1Lazy)
                        .authenticate(noise)
                        .multiplex(yamux::Config::default())
                        .timeout(Duration::from_secs(10)),
                )
            },
        )
        .map_err(|e| build_err(&e))?
        .with_behaviour(
            |key| -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
                let gossip_config = gossipsub::ConfigBuilder::default()
                    .heartbeat_interval(Duration::from_secs(1))
                    .mesh_n(3)
                    .mesh_n_low(2)
                    .mesh_n_high(6)
                    .gossip_lazy(3)
                    .mesh_outbound_min(1)
                    .max_transmit_size(64 * 1024)
                    .validation_mode(gossipsub::ValidationMode::Permissive)
                    .flood_publish(true)
                    .build()?;
                let gossipsub = gossipsub::Behaviour::new(
                    // Only mesh-key holders can connect at all (pnet + noise), and records are
                    // relayed by anti-entropy without their author anyway, so a per-message
                    // signature would add little beyond one ed25519 verification per message
                    // received, which was the largest idle cost in a 20-node mesh.
                    gossipsub::MessageAuthenticity::Author(key.public().to_peer_id()),
                    gossip_config,
                )?;
                let codec = request_response::cbor::codec::Codec::default()
                    .set_request_size_maximum(8 << 20)
                    .set_response_size_maximum(16 << 20);
                let rpc = request_response::Behaviour::with_codec(
                    codec,
                    [(StreamProtocol::new(RPC_PROTOCOL), ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(10)),
                );
                let identify = identify::Behaviour::new(identify::Config::new(
                    "/codex-mesh/1".into(),
                    key.public(),
                ));
                let ping = ping::Behaviour::new(
                    ping::Config::new()
                        .with_interval(Duration::from_secs(15))
                        .with_timeout(Duration::from_secs(10)),
                );
                Ok(Behaviour {
                    gossipsub,
                    rpc,
                    identify,
                    ping,
                })
            },
        )
        .map_err(|e| build_err(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    let topic = gossipsub::IdentTopic::new(STATE_TOPIC);
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&topic)
        .map_err(|e| build_err(&e))?;
    swarm
        .listen_on(listen.clone())
        .map_err(|e| NetError::Listen {
            addr: listen.clone(),
            reason: e.to_string(),
        })?;
    let (commands_tx, commands) = mpsc::unbounded_channel();
    let (events, events_rx) = mpsc::unbounded_channel();
    let event_loop = EventLoop {
        swarm,
        commands,
        events,
        pending: HashMap::new(),
        topic,
        metrics,
    };
    Ok((
        Client {
            commands: commands_tx,
        },
        events_rx,
        event_loop,
    ))
}

impl EventLoop {
    /// Run until every client handle is dropped.
    pub async fn run(mut self) {
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => return,
                },
            }
        }
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Publish(data) => {
                match self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(self.topic.clone(), data)
                {
                    Ok(_) => Metrics::inc(&self.metrics.gossip_out),
                    // Alone in the mesh, or every peer already has it: nothing to do.
                    Err(gossipsub::PublishError::NoPeersSubscribedToTopic)
                    | Err(gossipsub::PublishError::Duplicate) => {}
                    Err(e) => tracing::debug!("gossip publish failed: {e}"),
                }
            }
            Command::Request {
                peer,
                request,
                reply,
            } => {
                let id = self.swarm.behaviour_mut().rpc.send_request(&peer, request);
                self.pending.insert(id, reply);
            }
            Command::Respond { channel, response } => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .rpc
                    .send_response(channel, response);
            }
            Command::Dial { peer, addrs } => {
                let opts = match peer {
                    Some(peer) => {
                        for addr in &addrs {
                            self.swarm.add_peer_address(peer, addr.clone());
                        }
                        DialOpts::peer_id(peer).addresses(addrs).build()
                    }
                    None => match addrs.into_iter().next() {
                        Some(addr) => DialOpts::unknown_peer_id().address(addr).build(),
                        None => return,
                    },
                };
                if let Err(e) = self.swarm.dial(opts) {
                    tracing::debug!("dial failed: {e}");
                }
            }
            Command::Disconnect(peer) => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => self.emit(Event::Listening(address)),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                Metrics::set(
                    &self.metrics.peers_connected,
                    self.swarm.connected_peers().count() as u64,
                );
                if num_established.get() == 1 {
                    self.emit(Event::Connected {
                        peer: peer_id,
                        addr: endpoint.get_remote_address().clone(),
                    });
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                ..
            } => {
                Metrics::set(
                    &self.metrics.peers_connected,
                    self.swarm.connected_peers().count() as u64,
                );
                if num_established == 0 {
                    self.emit(Event::Disconnected(peer_id));
                }
            }
            SwarmEvent::IncomingConnectionError {
                error,
                send_back_addr,
                ..
            } => {
                tracing::debug!("refused incoming connection from {send_back_addr}: {error}");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                message,
                ..
            })) => match message.source {
                Some(source) => self.emit(Event::Gossip {
                    source,
                    data: message.data,
                }),
                None => Metrics::inc(&self.metrics.gossip_dropped),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Rpc(event)) => self.on_rpc_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                for addr in &info.listen_addrs {
                    self.swarm.add_peer_address(peer_id, addr.clone());
                }
                self.emit(Event::PeerAddrs {
                    peer: peer_id,
                    addrs: info.listen_addrs,
                });
            }
            _ => {}
        }
    }

    fn on_rpc_event(&mut self, event: request_response::Event<Request, Response>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    self.emit(Event::Request {
                        peer,
                        request,
                        channel,
                    });
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.pending.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some(reply) = self.pending.remove(&request_id) {
                    let _ = reply.send(Err(error.to_string()));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                // Malformed or oversized requests end here: count, never crash.
                Metrics::inc(&self.metrics.wire_dropped);
                tracing::debug!("inbound request from {peer} failed: {error}");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}
