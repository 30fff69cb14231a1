//! Encoding and framing.
//!
//! A frame is `len: u32 LE` then `len` bytes of body; a body is `version: u16 LE` then the
//! bincode encoding (standard config) of the message. bincode is kept behind these
//! functions so it can be swapped (it is unmaintained; see DESIGN.md) without touching
//! callers.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::PROTOCOL_VERSION;

/// Largest body accepted, in bytes. Sized for a prefill chunk of hidden states
/// (512 tokens x 8192 hidden x f32 = 16 MiB) with room to spare; anything larger is a
/// bug or an attack. Clients split long prompts into chunks that fit.
pub const MAX_FRAME_BYTES: usize = 64 << 20;

/// bincode's configuration, with the same hard limit, so a length field inside the body
/// cannot make the decoder allocate more than a frame may hold.
type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_FRAME_BYTES>,
>;

fn config() -> Config {
    bincode::config::standard().with_limit::<MAX_FRAME_BYTES>()
}

/// Everything that can go wrong turning bytes into messages.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The frame announces more bytes than [`MAX_FRAME_BYTES`].
    #[error("frame of {frame_len} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    FrameTooLarge {
        /// Announced length.
        frame_len: usize,
    },
    /// The body is shorter than its header.
    #[error("frame of {len} bytes is too short to hold a message")]
    Truncated {
        /// Length received.
        len: usize,
    },
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {got}, this node speaks {PROTOCOL_VERSION}")]
    VersionMismatch {
        /// Version found in the frame.
        got: u16,
    },
    /// The body does not decode to the expected message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The body decodes but leaves bytes over.
    #[error("message has {extra} trailing bytes")]
    TrailingBytes {
        /// Bytes left over.
        extra: usize,
    },
    /// A hidden-state tensor is inconsistent.
    #[error("bad hidden state: {reason}")]
    BadHiddenState {
        /// What is wrong.
        reason: String,
    },
    /// Encoding failed (the message is larger than a frame may be).
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// Encodes a message body: version, then bincode.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let mut out = PROTOCOL_VERSION.to_le_bytes().to_vec();
    bincode::serde::encode_into_std_write(msg, &mut out, config())
        .map_err(|e| ProtocolError::Encode(e.to_string()))?;
    if out.len() > MAX_FRAME_BYTES {
        return Err(ProtocolError::FrameTooLarge {
            frame_len: out.len(),
        });
    }
    Ok(out)
}

/// Encodes a whole frame: length prefix and body.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let body = encode(msg)?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads a frame header and checks the length against the limit.
pub fn decode_frame_len(header: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(ProtocolError::FrameTooLarge { frame_len: len });
    }
    Ok(len)
}

/// Decodes a message body. Any input gives a message or an error, never a panic.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, ProtocolError> {
    if body.len() > MAX_FRAME_BYTES {
        return Err(ProtocolError::FrameTooLarge {
            frame_len: body.len(),
        });
    }
    let Some((version, rest)) = body.split_first_chunk::<2>() else {
        return Err(ProtocolError::Truncated { len: body.len() });
    };
    let version = u16::from_le_bytes(*version);
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::VersionMismatch { got: version });
    }
    let (msg, used) = bincode::serde::decode_from_slice(rest, config())
        .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if used != rest.len() {
        return Err(ProtocolError::TrailingBytes {
            extra: rest.len() - used,
        });
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;

    fn sample_step() -> Frame {
        Frame::Step(Step {
            session: 42,
            step: 7,
            position: 19,
            hidden: HiddenState::from_f32(&[1.0, -2.0, 3.5, 0.25], vec![2, 2], WireDType::F32),
            next: vec![Hop {
                peer: "12D3KooWpeer".into(),
                span: BlockSpan::new(10, 20),
                addrs: vec!["/ip4/127.0.0.1/udp/1/quic-v1".into()],
                session: 43,
            }],
            reply_to: "12D3KooWclient".into(),
        })
    }

    #[test]
    fn every_message_round_trips() {
        let requests = vec![
            Request::Info,
            Request::Open(OpenSession {
                session: 1,
                model_id: "m".into(),
                span: BlockSpan::new(0, 10),
                max_len: 2048,
                wire_dtype: WireDType::F16,
            }),
            Request::Close { session: 9 },
            Request::Leaving(StepFailed {
                session: 1,
                step: 2,
                peer: "p".into(),
                error: ErrorInfo::new(ErrorKind::Leaving, "bye"),
            }),
            Request::Resize {
                session: 9,
                max_len: 300,
            },
        ];
        for m in requests {
            let body = encode(&m).expect("encodes");
            let back: Request = decode(&body).expect("decodes");
            assert_eq!(back, m);
        }
        let frames = vec![
            sample_step(),
            Frame::Failed(StepFailed {
                session: 1,
                step: 2,
                peer: "p".into(),
                error: ErrorInfo::new(ErrorKind::Unreachable, "gone"),
            }),
        ];
        for f in frames {
            let body = encode(&f).expect("encodes");
            let back: Frame = decode(&body).expect("decodes");
            assert_eq!(back, f);
        }
        let frame = encode_frame(&Response::Accepted).expect("encodes");
        let len = decode_frame_len(frame[..4].try_into().expect("4 bytes")).expect("fits");
        assert_eq!(len, frame.len() - 4);
        let back: Response = decode(&frame[4..]).expect("decodes");
        assert_eq!(back, Response::Accepted);
    }

    #[test]
    fn refuses_other_versions_truncation_and_trailing_bytes() {
        let mut body = encode(&sample_step()).expect("encodes");
        assert!(matches!(
            decode::<Frame>(&body[..1]),
            Err(ProtocolError::Truncated { .. })
        ));
        for cut in 2..body.len() {
            assert!(decode::<Frame>(&body[..cut]).is_err(), "cut at {cut}");
        }
        body.push(0);
        assert!(matches!(
            decode::<Frame>(&body),
            Err(ProtocolError::TrailingBytes { extra: 1 })
        ));
        body[0] = 99;
        assert!(matches!(
            decode::<Frame>(&body),
            Err(ProtocolError::VersionMismatch { got: 99 })
        ));
        assert!(matches!(
            decode_frame_len(u32::MAX.to_le_bytes()),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic generator (xorshift) so the test needs no extra crates;
        // the fuzz targets of the security issue go much further.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let valid = encode(&sample_step()).expect("encodes");
        for i in 0..20_000 {
            let mut bytes = if i % 2 == 0 {
                valid.clone()
            } else {
                let n = (next() % 256) as usize;
                (0..n).map(|_| next() as u8).collect()
            };
            if !bytes.is_empty() {
                for _ in 0..(next() % 4) {
                    let at = (next() as usize) % bytes.len();
                    bytes[at] = next() as u8;
                }
                // Past the version check, to reach the message decoder.
                let version = PROTOCOL_VERSION.to_le_bytes();
                bytes[0] = version[0];
                if bytes.len() > 1 {
                    bytes[1] = version[1];
                }
            }
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Frame>(&bytes);
            let _ = decode::<Response>(&bytes);
        }
    }
}
