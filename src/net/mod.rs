//! The libp2p peer. One [`EventLoop`] task owns the `Swarm`; the rest of the program talks to
//! it through the cloneable [`Client`] and receives [`Event`]s from a channel.
//!
//! Transport: TCP, then the private-network handshake with the mesh key (a peer without the
//! key cannot even start noise), then noise, then yamux. Peers exchange their protocol version
//! with identify ([`version`]); the rest of the program hears of a peer only once its version
//! is known to be compatible ([`admission`]).
//!
//! Requests travel on two request-response protocols: election messages on their own
//! ([`ELECTION_PROTOCOL`]), with a small stream budget and a short timeout, so that no other
//! traffic can hold them up; everything else on [`RPC_PROTOCOL`].

mod admission;
pub mod version;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
use crate::wire::{Request, Response, ELECTION_PROTOCOL, RPC_PROTOCOL, STATE_TOPIC};
use admission::{Admission, Verdict};

/// Streams one connection may have open at once on [`RPC_PROTOCOL`], both directions
/// together; an inbound request over the budget is dropped (its sender sees a failure).
pub const RPC_STREAMS: usize = 128;
/// How long a request on [`RPC_PROTOCOL`] may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams one connection may have open at once on [`ELECTION_PROTOCOL`]. A leader sends a
/// heartbeat to each peer every 250 ms and each is answered at once, so this leaves room for
/// a slow peer while keeping the protocol's streams well within yamux's limit per connection.
pub const ELECTION_STREAMS: usize = 32;
/// How long an election request may take: an answer later than a lease is of no use.
const ELECTION_TIMEOUT: Duration = Duration::from_secs(2);

/// Which request-response protocol a request travels on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Channel {
    Rpc,
    Election,
}

impl Channel {
    fn of(request: &Request) -> Channel {
        match request {
            Request::Election(_) => Channel::Election,
            _ => Channel::Rpc,
        }
    }
}

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
    election: request_response::cbor::Behaviour<Request, Response>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

/// Something that happened on the network.
#[derive(Debug)]
pub enum Event {
    /// We listen on a new address.
    Listening(Multiaddr),
    /// A peer is connected and speaks our protocol version (its first connection opened and
    /// identify showed its version).
    Connected {
        /// The peer.
        peer: PeerId,
        /// The address of the connection as seen from here.
        addr: Multiaddr,
    },
    /// Last connection to a peer that was [`Event::Connected`] closed.
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
    /// Outbound requests by protocol and id (each protocol numbers its requests itself).
    pending: HashMap<(Channel, OutboundRequestId), oneshot::Sender<Result<Response, String>>>,
    topic: gossipsub::IdentTopic,
    metrics: Arc<Metrics>,
    admission: Admission,
    /// Our protocol major version.
    major: u32,
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
                        .with_request_timeout(RPC_TIMEOUT)
                        .with_max_concurrent_streams(RPC_STREAMS),
                );
                // Election messages are small (a few voters and terms).
                let election_codec = request_response::cbor::codec::Codec::default()
                    .set_request_size_maximum(64 << 10)
                    .set_response_size_maximum(64 << 10);
                let election = request_response::Behaviour::with_codec(
                    election_codec,
                    [(
                        StreamProtocol::new(ELECTION_PROTOCOL),
                        ProtocolSupport::Full,
                    )],
                    request_response::Config::default()
                        .with_request_timeout(ELECTION_TIMEOUT)
                        .with_max_concurrent_streams(ELECTION_STREAMS),
                );
                let identify = identify::Behaviour::new(
                    identify::Config::new(version::local(), key.public())
                        .with_agent_version(format!("codex-mesh/{}", env!("CARGO_PKG_VERSION"))),
                );
                let ping = ping::Behaviour::new(
                    ping::Config::new()
                        .with_interval(Duration::from_secs(15))
                        .with_timeout(Duration::from_secs(10)),
                );
                Ok(Behaviour {
                    gossipsub,
                    rpc,
                    election,
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
        admission: Admission::default(),
        major: version::local_major(),
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
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => return,
                },
                _ = tick.tick() => self.expire_unidentified(),
            }
        }
    }

    /// Disconnect peers that connected but never told us their version.
    fn expire_unidentified(&mut self) {
        for peer in self.admission.expire(Instant::now()) {
            tracing::warn!(
                "peer {peer} did not identify itself within {}s: disconnecting",
                admission::IDENTIFY_TIMEOUT.as_secs()
            );
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Deliver a message from `peer` now, or once it is admitted.
    fn deliver(&mut self, peer: &PeerId, event: Event) {
        if let Some(event) = self.admission.deliver(peer, event) {
            self.emit(event);
        }
    }

    /// Identify told us a peer's version: admit it or refuse it.
    fn on_identified(&mut self, peer: PeerId, info: identify::Info) {
        match self
            .admission
            .identified(peer, self.major, &info.protocol_version, Instant::now())
        {
            Verdict::Admitted(events) => {
                for event in events {
                    self.emit(event);
                }
            }
            Verdict::Unchanged => {}
            Verdict::Refused {
                error,
                warn,
                was_admitted,
            } => {
                let ours = version::format(self.major, version::PROTOCOL_MINOR);
                if warn {
                    tracing::warn!(
                        "refusing peer {peer}: it speaks protocol {:?} ({:?}), this node speaks {ours:?}: {error}",
                        info.protocol_version,
                        info.agent_version
                    );
                } else {
                    tracing::debug!("refusing peer {peer} again: {error}");
                }
                if was_admitted {
                    self.emit(Event::Disconnected(peer));
                }
                let _ = self.swarm.disconnect_peer_id(peer);
                return;
            }
        }
        if !self.admission.is_admitted(&peer) {
            return;
        }
        for addr in &info.listen_addrs {
            self.swarm.add_peer_address(peer, addr.clone());
        }
        self.emit(Event::PeerAddrs {
            peer,
            addrs: info.listen_addrs,
        });
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
                if self.admission.recently_refused(&peer, Instant::now()) {
                    let _ = reply.send(Err(
                        "the peer speaks an incompatible protocol version".into()
                    ));
                    return;
                }
                let channel = Channel::of(&request);
                let behaviour = self.swarm.behaviour_mut();
                let id = match channel {
                    Channel::Rpc => behaviour.rpc.send_request(&peer, request),
                    Channel::Election => behaviour.election.send_request(&peer, request),
                };
                self.pending.insert((channel, id), reply);
            }
            Command::Respond { channel, response } => {
                // A response channel is the same oneshot for either protocol: answering it
                // through `rpc` also answers a request that came in on `election`.
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .rpc
                    .send_response(channel, response);
            }
            Command::Dial { peer, addrs } => {
                let opts = match peer {
                    Some(peer) if self.admission.recently_refused(&peer, Instant::now()) => {
                        tracing::debug!("not dialling {peer}: refused for its protocol version");
                        return;
                    }
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
                    // Announced once identify shows a compatible version.
                    self.admission.connected(
                        peer_id,
                        endpoint.get_remote_address().clone(),
                        Instant::now(),
                    );
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
                if num_established == 0 && self.admission.closed(&peer_id) {
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
                propagation_source,
                message,
                ..
            })) => match message.source {
                Some(source) => self.deliver(
                    &propagation_source,
                    Event::Gossip {
                        source,
                        data: message.data,
                    },
                ),
                None => Metrics::inc(&self.metrics.gossip_dropped),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Rpc(event)) => {
                self.on_rpc_event(Channel::Rpc, event)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Election(event)) => {
                self.on_rpc_event(Channel::Election, event)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => self.on_identified(peer_id, info),
            _ => {}
        }
    }

    fn on_rpc_event(&mut self, on: Channel, event: request_response::Event<Request, Response>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    if on == Channel::Election && Channel::of(&request) != Channel::Election {
                        // The election protocol's budget is for election messages only.
                        Metrics::inc(&self.metrics.wire_dropped);
                        return;
                    }
                    self.deliver(
                        &peer,
                        Event::Request {
                            peer,
                            request,
                            channel,
                        },
                    );
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.pending.remove(&(on, request_id)) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some(reply) = self.pending.remove(&(on, request_id)) {
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
