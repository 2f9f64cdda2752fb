//! The payloads Latus devices send each other over XMPP, in the namespace
//! `urn:latus:0`, carried in `headline` messages (never stored offline, never
//! copied to other resources by carbons):
//!
//! ```xml
//! <announce xmlns='urn:latus:0' peer='PEERID'><addr>192.0.2.7:22400</addr></announce>
//! <changed xmlns='urn:latus:0' folder='photos' seq='1234'/>
//! ```
//!
//! Everything read here comes from the network: sizes are bounded, the peer id
//! carries its check characters, addresses must be IP:port.

use std::net::SocketAddr;

use tokio_xmpp::minidom::Element;

use crate::device::PeerId;
use crate::shares::check_folder_id;

pub const NS: &str = "urn:latus:0";
/// A payload larger than this (serialised) is dropped unread.
pub const MAX_PAYLOAD_BYTES: usize = 4096;
/// More addresses than this in one announcement is not a real device.
pub const MAX_ADDRS: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// "I am this peer id; my data plane listens here."
    Announce {
        peer: PeerId,
        addrs: Vec<SocketAddr>,
    },
    /// "My history of this folder reaches this sequence number."
    Changed { folder: String, seq: u64 },
}

impl Payload {
    pub fn to_element(&self) -> Element {
        match self {
            Payload::Announce { peer, addrs } => Element::builder("announce", NS)
                .attr(
                    "peer".try_into().expect("a valid attribute name"),
                    peer.to_string(),
                )
                .append_all(addrs.iter().map(|addr| {
                    Element::builder("addr", NS)
                        .append(addr.to_string())
                        .build()
                }))
                .build(),
            Payload::Changed { folder, seq } => Element::builder("changed", NS)
                .attr(
                    "folder".try_into().expect("a valid attribute name"),
                    folder.as_str(),
                )
                .attr(
                    "seq".try_into().expect("a valid attribute name"),
                    seq.to_string(),
                )
                .build(),
        }
    }

    /// `None` if the element is not ours; an error (the reason to log) if it is
    /// ours but malformed or too large.
    pub fn from_element(element: &Element) -> Option<Result<Payload, String>> {
        if element.ns() != NS {
            return None;
        }
        Some(parse(element))
    }
}

fn parse(element: &Element) -> Result<Payload, String> {
    let size = String::from(element).len();
    if size > MAX_PAYLOAD_BYTES {
        return Err(format!(
            "{size} bytes, more than {MAX_PAYLOAD_BYTES} allowed"
        ));
    }
    let attr = |name: &'static str| {
        element
            .attr(name)
            .ok_or_else(|| format!("<{}> without {name}", element.name()))
    };
    match element.name() {
        "announce" => {
            let peer = attr("peer")?.parse::<PeerId>().map_err(|e| e.to_string())?;
            let mut addrs = Vec::new();
            for child in element.children() {
                if !child.is("addr", NS) {
                    continue;
                }
                if addrs.len() == MAX_ADDRS {
                    return Err(format!("more than {MAX_ADDRS} addresses"));
                }
                let text = child.text();
                let addr = text
                    .trim()
                    .parse::<SocketAddr>()
                    .map_err(|_| format!("bad address {text:?}"))?;
                if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_multicast() {
                    return Err(format!("address {addr} cannot be dialled"));
                }
                addrs.push(addr);
            }
            Ok(Payload::Announce { peer, addrs })
        }
        "changed" => {
            let folder = attr("folder")?.to_string();
            check_folder_id(&folder).map_err(|e| e.to_string())?;
            let seq = attr("seq")?
                .parse::<u64>()
                .map_err(|_| "seq is not a number".to_string())?;
            Ok(Payload::Changed { folder, seq })
        }
        other => Err(format!("unknown element <{other}>")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        PeerId([7; 32])
    }

    fn parse_xml(xml: &str) -> Option<Result<Payload, String>> {
        let element: Element = xml.parse().expect("test XML parses");
        Payload::from_element(&element)
    }

    #[test]
    fn payloads_round_trip() {
        for payload in [
            Payload::Announce {
                peer: peer(),
                addrs: vec![
                    "127.0.0.1:22400".parse().unwrap(),
                    "[::1]:7".parse().unwrap(),
                ],
            },
            Payload::Announce {
                peer: peer(),
                addrs: vec![],
            },
            Payload::Changed {
                folder: "photos".into(),
                seq: u64::MAX,
            },
        ] {
            let back = Payload::from_element(&payload.to_element());
            assert_eq!(back, Some(Ok(payload)));
        }
    }

    #[test]
    fn other_namespaces_are_not_ours() {
        assert_eq!(parse_xml("<body xmlns='jabber:client'>hi</body>"), None);
    }

    #[test]
    fn malformed_payloads_are_refused_with_a_reason() {
        let id = peer().to_string();
        let mut mistyped = id.clone();
        let last = if mistyped.ends_with('A') { 'B' } else { 'A' };
        mistyped.pop();
        mistyped.push(last);
        let cases = [
            format!("<announce xmlns='{NS}'/>"),
            format!("<announce xmlns='{NS}' peer='{mistyped}'/>"),
            format!("<announce xmlns='{NS}' peer='{id}'><addr>example.org:1</addr></announce>"),
            format!("<announce xmlns='{NS}' peer='{id}'><addr>0.0.0.0:1</addr></announce>"),
            format!("<announce xmlns='{NS}' peer='{id}'><addr>127.0.0.1:0</addr></announce>"),
            format!("<changed xmlns='{NS}' folder='../x' seq='1'/>"),
            format!("<changed xmlns='{NS}' folder='x' seq='-1'/>"),
            format!("<changed xmlns='{NS}' folder='x'/>"),
            format!("<launch xmlns='{NS}'/>"),
        ];
        for xml in cases {
            assert!(
                matches!(parse_xml(&xml), Some(Err(_))),
                "{xml} should be refused"
            );
        }
    }

    #[test]
    fn oversized_payloads_are_refused() {
        let id = peer().to_string();
        let addrs = "<addr>127.0.0.1:1</addr>".repeat(MAX_ADDRS + 1);
        let too_many = format!("<announce xmlns='{NS}' peer='{id}'>{addrs}</announce>");
        assert!(matches!(parse_xml(&too_many), Some(Err(e)) if e.contains("addresses")));
        let padding = "x".repeat(MAX_PAYLOAD_BYTES);
        let huge = format!("<changed xmlns='{NS}' folder='x' seq='1'>{padding}</changed>");
        assert!(matches!(parse_xml(&huge), Some(Err(e)) if e.contains("bytes")));
    }
}
