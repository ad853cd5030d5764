//! The LUKS (version 1) header of an encrypted qcow2 image, as far as `qemu-img info`
//! reports it. Parsing only: the engine does not decrypt (it refuses encrypted images except
//! for metadata-only opens).
//!
//! Layout (big-endian): magic "LUKS\xba\xbe", version (u16), cipher name, cipher mode and
//! hash spec (32-byte NUL-padded strings), payload offset (u32, sectors), key bytes (u32),
//! master-key digest (20), salt (32) and iterations (u32), UUID (40-byte string), then eight
//! 48-byte key slots: active marker, iterations, salt (32), key material offset (sectors),
//! stripes.

use crate::error::{Error, Result};

/// The magic at the start of a LUKS header.
const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// A key slot in use.
const SLOT_ACTIVE: u32 = 0x00AC_71F3;
/// Bytes of the header up to the end of the key slots.
const HEADER_LEN: usize = 208 + 8 * SLOT_LEN;
/// Bytes of one key slot.
const SLOT_LEN: usize = 48;

/// The fields of a LUKS header that `qemu-img info` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksHeader {
    /// Cipher name as stored ("aes", "twofish", ...).
    pub cipher_name: String,
    /// Cipher mode with its IV generator as stored ("xts-plain64", "cbc-essiv:sha256").
    pub cipher_mode: String,
    /// Hash of the key derivation ("sha256").
    pub hash_spec: String,
    /// Where the encrypted payload starts, in bytes from the header.
    pub payload_offset: u64,
    /// Bytes of the master key.
    pub key_bytes: u32,
    /// PBKDF2 iterations of the master-key digest.
    pub master_key_iters: u32,
    /// The volume UUID.
    pub uuid: String,
    /// The eight key slots.
    pub slots: Vec<LuksSlot>,
}

/// One key slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuksSlot {
    /// Whether the slot holds a key.
    pub active: bool,
    /// PBKDF2 iterations of the slot's key.
    pub iters: u32,
    /// Where the slot's key material starts, in bytes from the header.
    pub key_offset: u64,
    /// Anti-forensic stripes of the key material.
    pub stripes: u32,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// A NUL-padded string field.
fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

impl LuksHeader {
    /// Parses the header at the start of `b`.
    pub fn parse(b: &[u8]) -> Result<LuksHeader> {
        let invalid = |why: &str| Error::InvalidHeader(format!("LUKS header: {why}"));
        if b.len() < HEADER_LEN {
            return Err(invalid("too short"));
        }
        if &b[..6] != MAGIC {
            return Err(invalid("bad magic"));
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(invalid(&format!("unsupported version {version}")));
        }
        let slots = (0..8)
            .map(|i| {
                let s = &b[208 + i * SLOT_LEN..208 + (i + 1) * SLOT_LEN];
                LuksSlot {
                    active: be32(s, 0) == SLOT_ACTIVE,
                    iters: be32(s, 4),
                    key_offset: u64::from(be32(s, 40)) * 512,
                    stripes: be32(s, 44),
                }
            })
            .collect();
        Ok(LuksHeader {
            cipher_name: text(&b[8..40]),
            cipher_mode: text(&b[40..72]),
            hash_spec: text(&b[72..104]),
            payload_offset: u64::from(be32(b, 104)) * 512,
            key_bytes: be32(b, 108),
            master_key_iters: be32(b, 164),
            uuid: text(&b[168..208]),
            slots,
        })
    }

    /// The cipher mode without its IV generator ("xts").
    pub fn mode(&self) -> &str {
        self.cipher_mode.split('-').next().unwrap_or_default()
    }

    /// The IV generator ("plain64", "essiv").
    pub fn ivgen(&self) -> &str {
        let ivgen = self.cipher_mode.split_once('-').map_or("", |(_, iv)| iv);
        ivgen.split(':').next().unwrap_or_default()
    }

    /// The IV generator's hash, if it has one ("essiv:sha256" has sha256).
    pub fn ivgen_hash(&self) -> Option<&str> {
        self.cipher_mode.split_once(':').map(|(_, h)| h)
    }

    /// The cipher as QEMU names it ("aes-256"): the name with the key size in bits (XTS
    /// keys hold two cipher keys).
    pub fn cipher_alg(&self) -> String {
        let key_bits = self.key_bytes * 8 / if self.mode() == "xts" { 2 } else { 1 };
        match self.cipher_name.as_str() {
            "des3_ede" => "3des".to_owned(),
            "sm4" | "des" => self.cipher_name.clone(),
            name => format!("{name}-{key_bits}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(mode: &str, key_bytes: u32) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..6].copy_from_slice(MAGIC);
        b[7] = 1;
        b[8..11].copy_from_slice(b"aes");
        b[40..40 + mode.len()].copy_from_slice(mode.as_bytes());
        b[72..78].copy_from_slice(b"sha256");
        b[104..108].copy_from_slice(&4040u32.to_be_bytes());
        b[108..112].copy_from_slice(&key_bytes.to_be_bytes());
        b[164..168].copy_from_slice(&1000u32.to_be_bytes());
        b[168..172].copy_from_slice(b"uuid");
        b[208..212].copy_from_slice(&SLOT_ACTIVE.to_be_bytes());
        b[212..216].copy_from_slice(&77u32.to_be_bytes());
        b[248..252].copy_from_slice(&8u32.to_be_bytes());
        b[252..256].copy_from_slice(&4000u32.to_be_bytes());
        b
    }

    #[test]
    fn fields_and_qemu_names() {
        let h = LuksHeader::parse(&sample("xts-plain64", 64)).unwrap();
        assert_eq!(
            (h.cipher_alg(), h.mode(), h.ivgen()),
            ("aes-256".into(), "xts", "plain64")
        );
        assert_eq!((h.ivgen_hash(), h.hash_spec.as_str()), (None, "sha256"));
        assert_eq!((h.payload_offset, h.master_key_iters), (4040 * 512, 1000));
        assert_eq!(h.uuid, "uuid");
        let s = h.slots[0];
        assert_eq!(
            (s.active, s.iters, s.key_offset, s.stripes),
            (true, 77, 4096, 4000)
        );
        assert!(!h.slots[1].active);
        let h = LuksHeader::parse(&sample("cbc-essiv:sha256", 16)).unwrap();
        assert_eq!(
            (h.cipher_alg(), h.mode(), h.ivgen()),
            ("aes-128".into(), "cbc", "essiv")
        );
        assert_eq!(h.ivgen_hash(), Some("sha256"));
    }

    #[test]
    fn refuses_what_is_not_a_luks1_header() {
        let mut b = sample("xts-plain64", 64);
        assert!(matches!(
            LuksHeader::parse(&b[..100]),
            Err(Error::InvalidHeader(m)) if m.contains("too short")
        ));
        b[7] = 2;
        assert!(matches!(
            LuksHeader::parse(&b),
            Err(Error::InvalidHeader(m)) if m.contains("version 2")
        ));
        b[0] = b'X';
        assert!(matches!(
            LuksHeader::parse(&b),
            Err(Error::InvalidHeader(m)) if m.contains("magic")
        ));
    }
}
