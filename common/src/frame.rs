//! Framing: the one place that calls bincode. Every frame is a big-endian `u32` length and
//! a payload; the length is checked against a limit before anything is allocated.

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Limit for control messages (hello, reports, requests, receipts).
pub const CONTROL_LIMIT: usize = 1 << 20;
/// Limit for an encoded manifest (a tree of many files).
pub const MANIFEST_LIMIT: usize = 64 << 20;
/// Limit for one chunk of artifact data.
pub const CHUNK_LIMIT: usize = 4 << 20;
/// Limit for an admin request, which may carry a manifest.
pub const ADMIN_LIMIT: usize = MANIFEST_LIMIT + (1 << 20);

/// A blob length that means "not available".
const ABSENT: u32 = u32::MAX;

/// What can go wrong while framing.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame larger than we accept.
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    /// The payload is not a valid encoding of the expected message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The stream failed underneath us.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

fn config<const LIMIT: usize>() -> impl bincode::config::Config {
    bincode::config::standard().with_big_endian().with_fixed_int_encoding().with_limit::<LIMIT>()
}

/// Encodes a value with the canonical configuration (no length prefix).
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding into a Vec cannot fail for our types: they contain no maps with
    // unserialisable keys and the limit only applies to decoding.
    bincode::serde::encode_to_vec(value, config::<{ usize::MAX }>())
        .expect("encoding a protocol value into memory cannot fail")
}

/// Decodes a value, refusing inputs over `LIMIT` and any trailing bytes.
pub fn decode<T: DeserializeOwned, const LIMIT: usize>(bytes: &[u8]) -> Result<T, FrameError> {
    if bytes.len() > LIMIT {
        return Err(FrameError::TooLarge { len: bytes.len(), limit: LIMIT });
    }
    let (value, used) = bincode::serde::decode_from_slice(bytes, config::<LIMIT>())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(FrameError::Malformed(format!("{} trailing bytes", bytes.len() - used)));
    }
    Ok(value)
}

/// Writes one length-prefixed message.
pub async fn write_msg<W, T>(w: &mut W, value: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    write_blob(w, Some(&encode(value))).await
}

/// Reads one length-prefixed message; `Ok(None)` on a clean end of stream.
pub async fn read_msg<R, T, const LIMIT: usize>(r: &mut R) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    match read_blob::<R, LIMIT>(r).await? {
        Some(Some(bytes)) => decode::<T, LIMIT>(&bytes).map(Some),
        Some(None) => Err(FrameError::Malformed("absent marker where a message was expected".into())),
        None => Ok(None),
    }
}

/// Writes raw bytes with a length prefix, or the "absent" marker for `None`.
pub async fn write_blob<W: AsyncWrite + Unpin>(w: &mut W, bytes: Option<&[u8]>) -> Result<(), FrameError> {
    match bytes {
        Some(b) => {
            let len = u32::try_from(b.len())
                .ok()
                .filter(|&l| l != ABSENT)
                .ok_or(FrameError::TooLarge { len: b.len(), limit: (ABSENT - 1) as usize })?;
            w.write_all(&len.to_be_bytes()).await?;
            w.write_all(b).await?;
        }
        None => w.write_all(&ABSENT.to_be_bytes()).await?,
    }
    Ok(())
}

/// Reads raw bytes written by [`write_blob`]: `None` at a clean end of stream,
/// `Some(None)` for the absent marker.
pub async fn read_blob<R: AsyncRead + Unpin, const LIMIT: usize>(
    r: &mut R,
) -> Result<Option<Option<Vec<u8>>>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    r.read_exact(&mut len[1..]).await.map_err(eof_is_truncated)?;
    let len = u32::from_be_bytes(len);
    if len == ABSENT {
        return Ok(Some(None));
    }
    let len = len as usize;
    if len > LIMIT {
        return Err(FrameError::TooLarge { len, limit: LIMIT });
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.map_err(eof_is_truncated)?;
    Ok(Some(Some(buf)))
}

fn eof_is_truncated(e: std::io::Error) -> FrameError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        FrameError::Truncated
    } else {
        FrameError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_limits() {
        let mut buf = Vec::new();
        write_msg(&mut buf, &("hello".to_string(), 7u64)).await.unwrap();
        let mut r = &buf[..];
        let v: Option<(String, u64)> = read_msg::<_, _, 64>(&mut r).await.unwrap();
        assert_eq!(v, Some(("hello".to_string(), 7)));
        let mut r = &buf[..];
        let err = read_msg::<_, (String, u64), 8>(&mut r).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn huge_length_prefix_is_refused_before_allocating() {
        let bytes = [0xFF, 0xFF, 0xFF, 0xFE, 1, 2, 3];
        let mut r = &bytes[..];
        let err = read_blob::<_, CONTROL_LIMIT>(&mut r).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
    }

    #[test]
    fn lying_inner_length_is_refused() {
        // A Vec<u8> claiming 2^40 elements inside a 16-byte frame.
        let mut bytes = (1u64 << 40).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 8]);
        assert!(decode::<Vec<u8>, 64>(&bytes).is_err());
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&5u32);
        bytes.push(0);
        assert!(decode::<u32, 64>(&bytes).is_err());
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error_not_eof() {
        let bytes = [0, 0, 0, 9, 1, 2];
        let mut r = &bytes[..];
        assert!(matches!(read_blob::<_, 64>(&mut r).await, Err(FrameError::Truncated)));
        let mut empty: &[u8] = &[];
        assert!(read_blob::<_, 64>(&mut empty).await.unwrap().is_none());
    }
}
