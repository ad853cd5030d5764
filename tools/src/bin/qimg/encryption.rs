//! What qemu-img info shows of an encrypted qcow2 image (QAPI `QCryptoBlockInfo`): the
//! format, and for LUKS the header's cipher, hash and key slots. Read from the header alone;
//! no key is needed.

use qcow2::format::header::Header;
use qcow2::format::luks::LuksHeader;
use qcow2::Storage;

use crate::qjson::{dict, QObj};

/// The `encrypt` member of an encrypted image's format-specific information; `None` for an
/// unencrypted image.
pub fn encrypt_info(file: &dyn Storage, h: &Header) -> anyhow::Result<Option<QObj>> {
    match h.crypt_method {
        0 => Ok(None),
        1 => Ok(Some(dict([("format", Some("aes".into()))]))),
        _ => {
            let (offset, len) = h
                .luks_header_location()
                .ok_or_else(|| anyhow::anyhow!("Missing CRYPTO header for crypt method 2"))?;
            let len = usize::try_from(len.min(1 << 20))?;
            let mut bytes = vec![0u8; len];
            file.read_at(&mut bytes, offset)?;
            Ok(Some(luks_info(&LuksHeader::parse(&bytes)?)))
        }
    }
}

/// `QCryptoBlockInfoLUKS`, fields in QAPI order.
fn luks_info(l: &LuksHeader) -> QObj {
    let slots = l
        .slots
        .iter()
        .map(|s| {
            dict([
                ("active", Some(s.active.into())),
                ("iters", s.active.then(|| s.iters.into())),
                ("stripes", s.active.then(|| s.stripes.into())),
                ("key-offset", Some(s.key_offset.into())),
            ])
        })
        .collect();
    dict([
        ("format", Some("luks".into())),
        ("cipher-alg", Some(l.cipher_alg().into())),
        ("cipher-mode", Some(l.mode().into())),
        ("ivgen-alg", Some(l.ivgen().into())),
        ("ivgen-hash-alg", l.ivgen_hash().map(QObj::from)),
        ("hash-alg", Some(l.hash_spec.as_str().into())),
        ("detached-header", Some(false.into())),
        ("payload-offset", Some(l.payload_offset.into())),
        ("master-key-iters", Some(l.master_key_iters.into())),
        ("uuid", Some(l.uuid.as_str().into())),
        ("slots", Some(QObj::List(slots))),
    ])
}
