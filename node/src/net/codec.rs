//! The libp2p request-response codec of `/shoal/inference/2`: one frame per request
//! and one per response, framed and bounded by `protocol` (`MAX_FRAME_BYTES`).

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use protocol::{Request, Response};

/// Frames [`Request`]s and [`Response`]s with `protocol`'s codec.
#[derive(Clone, Default)]
pub(crate) struct ShoalCodec;

/// Reads one frame and decodes it; the length is checked against the limit first.
pub(crate) async fn read_frame<T, M>(io: &mut T) -> io::Result<M>
where
    T: AsyncRead + Unpin + Send,
    M: serde::de::DeserializeOwned,
{
    let mut header = [0u8; 4];
    io.read_exact(&mut header).await?;
    let len = protocol::decode_frame_len(header)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    // The length is checked against the limit before anything is allocated.
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    protocol::decode(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

pub(crate) async fn write_frame<T, M>(io: &mut T, msg: &M) -> io::Result<()>
where
    T: AsyncWrite + Unpin + Send,
    M: serde::Serialize,
{
    let frame =
        protocol::encode_frame(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    io.write_all(&frame).await?;
    io.flush().await
}

impl libp2p::request_response::Codec for ShoalCodec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res).await
    }
}
