//! The qcow2 header and its extensions: parsing, validation and serialisation.
//!
//! Pure code: it works on the bytes of cluster 0 and never touches a file.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

use crate::error::{Error, Result};

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible bit 0: refcounts may be stale.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible bit 1: the image is corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible bit 3: the compression_type field is in use.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Incompatible bits this crate implements.
pub const INCOMPAT_SUPPORTED: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit 1: the external data file is a valid raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Largest cluster size QEMU accepts (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Smallest cluster size (512 B).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest L1 table QEMU accepts, in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts, in bytes.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Length of a v2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Length of the v3 header we write (includes compression_type and padding).
pub const V3_HEADER_LEN: u32 = 112;

/// Compression algorithm for compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (QEMU calls it "zlib").
    Deflate,
    /// Zstandard.
    Zstd,
}

impl CompressionType {
    /// The name qemu-img uses ("zlib" or "zstd").
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Deflate => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// One entry of the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Human-readable name.
    pub name: String,
}

/// A header extension we do not interpret, kept byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownExtension {
    /// Extension magic.
    pub kind: u32,
    /// Extension payload (without padding).
    pub data: Vec<u8>,
}

/// The bitmaps header extension: where the bitmap directory is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// Raw extension payload.
    pub data: Vec<u8>,
}

impl BitmapsExtension {
    /// The extension for a directory of `count` bitmaps, `size` bytes at `offset`.
    pub fn new(count: u32, size: u64, offset: u64) -> Self {
        let mut data = Vec::with_capacity(24);
        data.extend_from_slice(&count.to_be_bytes());
        data.extend_from_slice(&[0; 4]);
        data.extend_from_slice(&size.to_be_bytes());
        data.extend_from_slice(&offset.to_be_bytes());
        BitmapsExtension { data }
    }
    /// Number of bitmaps in the directory.
    pub fn nb_bitmaps(&self) -> u32 {
        be32(&self.data, 0)
    }
    /// Size of the bitmap directory in bytes.
    pub fn directory_size(&self) -> u64 {
        be64(&self.data, 8)
    }
    /// Host offset of the bitmap directory.
    pub fn directory_offset(&self) -> u64 {
        be64(&self.data, 16)
    }
}

/// A parsed qcow2 header with its extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Number of L1 entries.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Length of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of refcount width in bits.
    pub refcount_order: u32,
    /// Header length (72 for v2).
    pub header_length: u32,
    /// Compression algorithm.
    pub compression_type: CompressionType,
    /// Bytes of the header between byte 112 and header_length (unknown fields), kept as-is.
    pub extra_header_bytes: Vec<u8>,
    /// Backing file name, if any: the header's bytes, which need not be UTF-8.
    pub backing_file: Option<OsString>,
    /// Backing file format from the extension, if any.
    pub backing_format: Option<String>,
    /// External data file name, if any: the extension's bytes, which need not be UTF-8.
    pub data_file: Option<OsString>,
    /// Feature name table, if present.
    pub feature_names: Vec<FeatureName>,
    /// Bitmaps extension, if present.
    pub bitmaps: Option<BitmapsExtension>,
    /// Encryption header pointer extension payload, if present.
    pub crypto: Option<Vec<u8>>,
    /// Extensions we do not know, preserved.
    pub unknown_extensions: Vec<UnknownExtension>,
}

/// A header extension's type and where its data lies in the header cluster.
type ExtensionAt = (u32, std::ops::Range<usize>);

pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}
pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidHeader(msg.into())
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether the lazy refcounts compatible bit is set.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Whether the dirty bit is set.
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }

    /// Whether the corrupt bit is set.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }

    /// Whether guest data is in an external data file (the incompatible bit; a data file
    /// name without it is only a name, as in QEMU).
    pub fn has_external_data(&self) -> bool {
        self.incompatible_features & INCOMPAT_DATA_FILE != 0
    }

    /// Whether the external data file is also a valid raw image.
    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
    }

    /// Whether L2 entries are extended (128 bits, with subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Bytes of one L2 entry: 16 with extended L2 entries, else 8.
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Subclusters per cluster: 32 with extended L2 entries, else 1.
    pub fn subclusters(&self) -> u64 {
        if self.extended_l2() {
            crate::format::tables::SUBCLUSTERS
        } else {
            1
        }
    }

    /// Number of entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_bytes()
    }

    /// Parses the fixed header from the first bytes of the file (at least 72, up to a cluster).
    ///
    /// `cluster0` should hold the first cluster (or the whole file if shorter) so extensions and
    /// the backing file name can be read.
    pub fn parse(cluster0: &[u8]) -> Result<Header> {
        let magic = cluster0.get(..4).map_or(0, |_| be32(cluster0, 0));
        if magic != MAGIC {
            return Err(Error::BadMagic(magic));
        }
        if cluster0.len() < V2_HEADER_LEN as usize {
            return Err(invalid("qcow2 header too short"));
        }
        let version = be32(cluster0, 4);
        if version != 2 && version != 3 {
            return Err(Error::UnsupportedVersion(version));
        }
        let cluster_bits = be32(cluster0, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(invalid(format!(
                "Unsupported cluster size: 2^{cluster_bits}"
            )));
        }
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(cluster0, 24),
            crypt_method: be32(cluster0, 32),
            l1_size: be32(cluster0, 36),
            l1_table_offset: be64(cluster0, 40),
            refcount_table_offset: be64(cluster0, 48),
            refcount_table_clusters: be32(cluster0, 56),
            nb_snapshots: be32(cluster0, 60),
            snapshots_offset: be64(cluster0, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Deflate,
            extra_header_bytes: Vec::new(),
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps: None,
            crypto: None,
            unknown_extensions: Vec::new(),
        };
        if version == 3 {
            if cluster0.len() < 104 {
                return Err(invalid("qcow2 header too short"));
            }
            h.incompatible_features = be64(cluster0, 72);
            h.compatible_features = be64(cluster0, 80);
            h.autoclear_features = be64(cluster0, 88);
            h.refcount_order = be32(cluster0, 96);
            h.header_length = be32(cluster0, 100);
            if h.header_length < 104 {
                return Err(invalid("qcow2 header too short"));
            }
            if h.header_length as u64 > h.cluster_size()
                || h.header_length as usize > cluster0.len()
            {
                return Err(invalid("qcow2 header exceeds cluster size"));
            }
            if h.header_length > 104 {
                h.compression_type = match cluster0[104] {
                    0 => CompressionType::Deflate,
                    1 => CompressionType::Zstd,
                    t => return Err(invalid(format!("qcow2: unknown compression type: {t}"))),
                };
            }
            if h.header_length > V3_HEADER_LEN {
                h.extra_header_bytes =
                    cluster0[V3_HEADER_LEN as usize..h.header_length as usize].to_vec();
            }
            if h.refcount_order > 6 {
                return Err(invalid(
                    "Reference count entry width too large; may not exceed 64 bits",
                ));
            }
        }
        let bit = h.incompatible_features & INCOMPAT_COMPRESSION != 0;
        if bit != (h.compression_type != CompressionType::Deflate) {
            let must = if bit { "must not" } else { "must" };
            return Err(invalid(format!(
                "qcow2: Compression type incompatible feature bit {must} be set"
            )));
        }
        h.parse_extensions(cluster0)?;
        h.parse_backing_name(cluster0)?;
        h.validate_geometry()?;
        Ok(h)
    }

    /// The header extensions in `cluster0`, walked as QEMU walks them
    /// (`qcow2_read_extensions`): each one's type and data, in order, then an error that
    /// ended the walk, if one did, and where the walk ended (after the end marker).
    fn walk_extensions(&self, cluster0: &[u8]) -> (Vec<ExtensionAt>, Option<Error>, usize) {
        let cluster_end = (self.cluster_size() as usize).min(cluster0.len());
        let mut off = self.header_length as usize;
        let limit = if self.backing_file_offset_raw(cluster0) != 0 {
            (self.backing_file_offset_raw(cluster0) as usize).min(cluster_end)
        } else {
            cluster_end
        };
        // Bytes past the end of a short file read as zeros (the end marker).
        let word = |at: usize| cluster0.get(at..at + 4).map_or(0, |_| be32(cluster0, at));
        let mut found = Vec::new();
        while off < limit {
            let kind = word(off);
            let len = word(off + 4) as usize;
            off += 8;
            if off > limit || len > limit - off {
                return (found, Some(invalid("Header extension too large")), off);
            }
            if kind == 0 {
                break;
            }
            found.push((kind, off..off + len));
            off += len.div_ceil(8) * 8;
        }
        (found, None, off)
    }

    /// The byte ranges of `cluster0` (the header cluster this header was parsed from) that
    /// the header is made of: the fixed part with its extensions, and the backing file name.
    pub fn ranges_used(&self, cluster0: &[u8]) -> [std::ops::Range<usize>; 2] {
        let (_, _, end) = self.walk_extensions(cluster0);
        // No backing file name without an offset, whatever the size says (as in QEMU).
        let name_at = be64(cluster0, 8) as usize;
        let name_len = if name_at == 0 {
            0
        } else {
            be32(cluster0, 16) as usize
        };
        [0..end, name_at..name_at + name_len]
    }

    fn parse_extensions(&mut self, cluster0: &[u8]) -> Result<()> {
        // QEMU's words.
        let (found, error, _) = self.walk_extensions(cluster0);
        for (kind, range) in found {
            let len = range.len();
            let data = &cluster0[range];
            match kind {
                EXT_BACKING_FORMAT if len >= 16 => {
                    return Err(invalid(format!(
                        "ERROR: ext_backing_format: len={len} too large (>=16)"
                    )))
                }
                EXT_BACKING_FORMAT => self.backing_format = Some(ext_string(data)),
                EXT_DATA_FILE => self.data_file = Some(OsStr::from_bytes(c_string(data)).into()),
                EXT_FEATURE_TABLE => {
                    self.feature_names = data
                        .chunks_exact(48)
                        .map(|e| FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: String::from_utf8_lossy(&e[2..])
                                .trim_end_matches('\0')
                                .to_string(),
                        })
                        .collect()
                }
                EXT_BITMAPS => {
                    if len < 24 {
                        return Err(invalid(
                            "qcow2 header: the bitmaps extension is shorter than 24 bytes",
                        ));
                    }
                    self.bitmaps = Some(BitmapsExtension {
                        data: data.to_vec(),
                    })
                }
                EXT_CRYPTO => self.crypto = Some(data.to_vec()),
                _ => self.unknown_extensions.push(UnknownExtension {
                    kind,
                    data: data.to_vec(),
                }),
            }
        }
        error.map_or(Ok(()), Err)
    }

    fn backing_file_offset_raw(&self, cluster0: &[u8]) -> u64 {
        be64(cluster0, 8)
    }

    fn parse_backing_name(&mut self, cluster0: &[u8]) -> Result<()> {
        let off = be64(cluster0, 8);
        let len = be32(cluster0, 16);
        if off == 0 {
            return Ok(());
        }
        // QEMU's checks and words.
        let cs = self.cluster_size();
        if off > cs {
            return Err(invalid("Invalid backing file offset"));
        }
        if len > MAX_BACKING_NAME.min((cs - off) as u32) {
            return Err(invalid("Backing file name too long"));
        }
        // Bytes past the end of a short file read as zeros, as QEMU reads them.
        let start = (off as usize).min(cluster0.len());
        let end = (off as usize + len as usize).min(cluster0.len());
        let name = &cluster0[start..end];
        // A C string to QEMU: it ends at the first NUL, and an empty one is no backing file.
        let name = name.split(|&b| b == 0).next().unwrap_or_default();
        if !name.is_empty() {
            self.backing_file = Some(OsStr::from_bytes(name).into());
        }
        Ok(())
    }

    fn validate_geometry(&self) -> Result<()> {
        let cs = self.cluster_size();
        let aligned = |o: u64| o % cs == 0;
        // QEMU's checks and words, in its order.
        if self.refcount_table_clusters as u64 * cs > MAX_REFTABLE_BYTES {
            return Err(invalid("Reference count table too large"));
        }
        if !aligned(self.refcount_table_offset) {
            return Err(invalid("Reference count table offset invalid"));
        }
        if self.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(invalid("Active L1 table too large"));
        }
        let l1_needed = self.size.div_ceil(self.l2_entries() * cs);
        if self.size > (1u64 << 62) || l1_needed > i32::MAX as u64 {
            return Err(invalid("Image is too big"));
        }
        if (self.l1_size as u64) < l1_needed {
            return Err(invalid("L1 table is too small"));
        }
        if !aligned(self.l1_table_offset) {
            return Err(invalid("Active L1 table offset invalid"));
        }
        Ok(())
    }

    /// Refuses tables over the header, which QEMU reads (as garbage) but a writer would
    /// write over the header: a refcount table, or a non-empty L1 table, at offset 0.
    pub fn check_tables_off_header(&self) -> Result<()> {
        if self.refcount_table_offset == 0 {
            return Err(invalid("Reference count table offset invalid"));
        }
        if self.l1_size > 0 && self.l1_table_offset == 0 {
            return Err(invalid("Active L1 table offset invalid"));
        }
        Ok(())
    }

    /// Returns an error naming the first incompatible feature we cannot handle.
    pub fn check_supported(&self) -> Result<()> {
        let unknown = self.incompatible_features & !INCOMPAT_SUPPORTED;
        if unknown != 0 {
            let bit = unknown.trailing_zeros();
            let name = self
                .feature_names
                .iter()
                .find(|f| f.kind == 0 && f.bit as u32 == bit)
                .map(|f| f.name.clone())
                .unwrap_or_else(|| format!("Unknown incompatible feature: {:x}", unknown));
            return Err(Error::UnsupportedFeature(name));
        }
        if self.crypt_method > 2 {
            return Err(invalid(format!(
                "Unsupported encryption method {}",
                self.crypt_method
            )));
        }
        if self.version == 2 && self.refcount_order != 4 {
            return Err(invalid(
                "qcow2 header: version 2 images must have 16-bit refcounts",
            ));
        }
        let subcluster = self.cluster_size() / self.subclusters();
        if subcluster < 1 << MIN_CLUSTER_BITS {
            return Err(invalid(format!(
                "Unsupported subcluster size: {subcluster}"
            )));
        }
        Ok(())
    }

    /// Refuses an encrypted image: the engine cannot decrypt (metadata-only opens skip this).
    pub fn check_unencrypted(&self) -> Result<()> {
        match self.crypt_method {
            0 => Ok(()),
            1 => Err(Error::UnsupportedFeature("AES encryption".into())),
            _ => Err(Error::UnsupportedFeature("LUKS encryption".into())),
        }
    }

    /// Where the LUKS header of an image encrypted with LUKS lies: (offset, length) from
    /// the full disk encryption header extension.
    pub fn luks_header_location(&self) -> Option<(u64, u64)> {
        let ext = self.crypto.as_ref().filter(|c| c.len() >= 16)?;
        let be64 = |at: usize| u64::from_be_bytes(ext[at..at + 8].try_into().expect("8 bytes"));
        (self.crypt_method == 2).then(|| (be64(0), be64(8)))
    }

    /// Serialises the header and its extensions into a buffer of at most one cluster.
    ///
    /// The backing file name is written after the extensions. Fails if it does not fit.
    pub fn serialize(&self) -> Result<Vec<u8>> {
        let mut b = Vec::with_capacity(4096);
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes()); // backing offset, patched below
        b.extend_from_slice(&0u32.to_be_bytes()); // backing size, patched below
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            let header_length = V3_HEADER_LEN + self.extra_header_bytes.len() as u32;
            b.extend_from_slice(&self.incompatible_features.to_be_bytes());
            b.extend_from_slice(&self.compatible_features.to_be_bytes());
            b.extend_from_slice(&self.autoclear_features.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&header_length.to_be_bytes());
            b.push(match self.compression_type {
                CompressionType::Deflate => 0,
                CompressionType::Zstd => 1,
            });
            b.extend_from_slice(&[0u8; 7]);
            b.extend_from_slice(&self.extra_header_bytes);
        }
        // Each extension's data is padded to 8 bytes from its own start, as readers (and
        // QEMU's `header_ext_add`) step: a header length that is no multiple of 8, which QEMU
        // accepts, keeps its extensions where they are looked for.
        let push_ext = |b: &mut Vec<u8>, kind: u32, data: &[u8]| {
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len() + data.len().next_multiple_of(8) - data.len(), 0);
        };
        if let Some(f) = &self.backing_format {
            push_ext(&mut b, EXT_BACKING_FORMAT, f.as_bytes());
        }
        if let Some(f) = &self.data_file {
            push_ext(&mut b, EXT_DATA_FILE, f.as_bytes());
        }
        if let Some(c) = &self.crypto {
            push_ext(&mut b, EXT_CRYPTO, c);
        }
        if let Some(bm) = &self.bitmaps {
            push_ext(&mut b, EXT_BITMAPS, &bm.data);
        }
        if !self.feature_names.is_empty() {
            let mut table = Vec::with_capacity(self.feature_names.len() * 48);
            for f in &self.feature_names {
                let mut e = [0u8; 48];
                e[0] = f.kind;
                e[1] = f.bit;
                let n = f.name.as_bytes();
                e[2..2 + n.len().min(46)].copy_from_slice(&n[..n.len().min(46)]);
                table.extend_from_slice(&e);
            }
            push_ext(&mut b, EXT_FEATURE_TABLE, &table);
        }
        for u in &self.unknown_extensions {
            push_ext(&mut b, u.kind, &u.data);
        }
        if self.version >= 3 || self.backing_file.is_some() || b.len() > V2_HEADER_LEN as usize {
            push_ext(&mut b, 0, &[]);
        }
        if let Some(name) = &self.backing_file {
            let off = b.len() as u64;
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() as u64 > self.cluster_size() {
            return Err(Error::InvalidOption(format!(
                "header and extensions ({} bytes) do not fit in one {}-byte cluster",
                b.len(),
                self.cluster_size()
            )));
        }
        Ok(b)
    }
}

/// The bytes of `data` up to its first NUL: a C string to QEMU.
fn c_string(data: &[u8]) -> &[u8] {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    &data[..end]
}

fn ext_string(data: &[u8]) -> String {
    // Bytes that are not UTF-8 show as U+FFFD, as in QEMU's JSON.
    String::from_utf8_lossy(c_string(data)).into_owned()
}

/// The feature name table QEMU writes into v3 images with `cluster_size`-byte clusters:
/// none up to 4 KiB (QEMU leaves it out so that a backing file name still fits into a
/// 512-byte cluster's header).
pub fn default_feature_names(cluster_size: u64) -> Vec<FeatureName> {
    if cluster_size <= 4096 {
        return Vec::new();
    }
    let f = |kind, bit, name: &str| FeatureName {
        kind,
        bit,
        name: name.to_string(),
    };
    vec![
        f(0, 0, "dirty bit"),
        f(0, 1, "corrupt bit"),
        f(0, 2, "external data file"),
        f(0, 3, "compression type"),
        f(0, 4, "extended L2 entries"),
        f(1, 0, "lazy refcounts"),
        f(2, 0, "bitmaps"),
        f(2, 1, "raw external data"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression_type: CompressionType::Deflate,
            extra_header_bytes: Vec::new(),
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            data_file: None,
            feature_names: default_feature_names(1 << 16),
            bitmaps: None,
            crypto: None,
            unknown_extensions: vec![UnknownExtension {
                kind: 0x1234_5678,
                data: vec![1, 2, 3],
            }],
        }
    }

    #[test]
    fn roundtrip_keeps_every_field_and_unknown_extension() {
        let h = sample();
        let mut bytes = h.serialize().unwrap();
        bytes.resize(65536, 0);
        assert_eq!(Header::parse(&bytes).unwrap(), h);
    }

    #[test]
    fn file_names_that_are_not_utf8_keep_their_bytes() {
        let mut h = sample();
        h.backing_file = Some(OsStr::from_bytes(b"caf\xe9.qcow2").into());
        h.data_file = Some(OsStr::from_bytes(b"d\xff\xfe.raw").into());
        let mut bytes = h.serialize().unwrap();
        let holds = |name: &[u8]| bytes.windows(name.len()).any(|w| w == name);
        assert!(holds(b"caf\xe9.qcow2") && holds(b"d\xff\xfe.raw"));
        bytes.resize(65536, 0);
        assert_eq!(Header::parse(&bytes).unwrap(), h);
    }

    #[test]
    fn extended_l2_needs_subclusters_of_512_bytes() {
        let mut h = sample();
        h.incompatible_features = INCOMPAT_EXTL2;
        assert_eq!(h.l2_entries(), 4096);
        h.check_supported().unwrap();
        h.cluster_bits = 13;
        let err = h.check_supported().unwrap_err();
        assert!(
            err.to_string().contains("Unsupported subcluster size: 256"),
            "{err}"
        );
    }

    #[test]
    fn unknown_incompatible_bit_is_named_from_feature_table() {
        let mut h = sample();
        h.incompatible_features = 1 << 5;
        h.feature_names.push(FeatureName {
            kind: 0,
            bit: 5,
            name: "future feature".into(),
        });
        let mut bytes = h.serialize().unwrap();
        bytes.resize(65536, 0);
        let err = Header::parse(&bytes)
            .unwrap()
            .check_supported()
            .unwrap_err();
        assert!(err.to_string().contains("future feature"), "{err}");
    }

    #[test]
    fn rejects_bad_magic_and_tiny_files() {
        assert!(matches!(
            Header::parse(&[0u8; 512]),
            Err(Error::BadMagic(0))
        ));
        let mut tiny = [0u8; 10];
        tiny[..4].copy_from_slice(b"QFI\xfb");
        let short = Header::parse(&tiny).unwrap_err();
        assert!(matches!(short, Error::InvalidHeader(_)), "{short}");
    }

    #[test]
    fn rejects_l1_too_small_for_size() {
        let mut h = sample();
        h.size = 1 << 40;
        let mut bytes = h.serialize().unwrap();
        bytes.resize(65536, 0);
        let small = Header::parse(&bytes).unwrap_err();
        assert!(small.to_string().contains("L1"), "{small}");
    }
}
