//! Sockets below the actors: the UDP endpoint that receives with its destination address
//! (IP_PKTINFO) and replies from it. Listeners and sessions both use it, so it sits beneath
//! them.

mod endpoint;

pub(crate) use endpoint::Endpoint;
