//! Cluster compression and decompression (raw deflate as QEMU writes it, and zstd).

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::format::header::CompressionType;

/// Decompresses `input` into exactly `out.len()` bytes. Trailing input is ignored.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        CompressionType::Deflate => {
            let mut d = Decompress::new_with_window_bits(false, 12);
            match d.decompress(input, out, FlushDecompress::Finish) {
                Ok(_) if d.total_out() as usize == out.len() => Ok(()),
                Ok(_) => Err(format!(
                    "deflate data produced {} of {} bytes",
                    d.total_out(),
                    out.len()
                )),
                Err(e) => Err(e.to_string()),
            }
        }
        CompressionType::Zstd => {
            use std::io::Read;
            let mut dec = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| e.to_string())?
                .single_frame();
            dec.read_exact(out).map_err(|e| e.to_string())
        }
    }
}

/// Compresses one cluster. Returns `None` when the result would not save space.
pub fn compress(kind: CompressionType, input: &[u8]) -> Option<Vec<u8>> {
    // As QEMU: compressed when that saves a byte (its output buffer is one byte short of
    // the cluster).
    let limit = input.len();
    let out = match kind {
        CompressionType::Deflate => {
            let mut c = Compress::new_with_window_bits(Compression::default(), false, 12);
            let mut out = Vec::with_capacity(input.len());
            match c.compress_vec(input, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => out,
                _ => return None,
            }
        }
        CompressionType::Zstd => zstd::bulk::compress(input, 0).ok()?,
    };
    (out.len() < limit).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_algorithms_roundtrip_and_refuse_incompressible_data() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            let c = compress(kind, &data).expect("compressible");
            let mut padded = c.clone();
            padded.extend_from_slice(&[0xaa; 300]);
            let mut out = vec![0u8; data.len()];
            decompress(kind, &padded, &mut out).unwrap();
            assert_eq!(out, data);
            let mut x = 0x2545_f491_4f6c_dd1du64;
            let noise: Vec<u8> = (0..65536)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            assert!(compress(kind, &noise).is_none());
            assert!(decompress(kind, &c[..c.len() / 2], &mut out).is_err());
        }
    }
}
