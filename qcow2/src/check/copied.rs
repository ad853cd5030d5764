//! The COPIED flag of active L1 and L2 entries: set exactly when the refcount is one
//! (QEMU's check_oflag_copied).

use super::count::{classify, Kind};
use super::{stored_refcount, strerror, Checker, Failed, Repair};
use crate::engine::meta::encode_u64_table;
use crate::engine::overlap::Target;
use crate::error::Error;
use crate::format::tables::{COPIED, OFFSET_MASK};

type Outcome = std::result::Result<(), Failed>;

/// `entry` with COPIED set or cleared.
fn with_copied(entry: u64, copied: bool) -> u64 {
    match copied {
        true => entry | COPIED,
        false => entry & !COPIED,
    }
}

impl Checker<'_> {
    /// Checks the COPIED flags; repairs them with [`Repair::All`], or with
    /// [`Repair::Leaks`] if nothing else is left wrong (the refcounts are right then).
    pub(super) fn check_copied(&mut self, mode: Repair) -> Outcome {
        let repair = mode.errors() || (mode.leaks() && self.report.is_clean());
        let l1 = self.img.meta().l1.clone();
        for (i, e) in l1.into_iter().enumerate() {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if let Some(rc) = self.refcount_at(l2) {
                if (rc == 1) != (e & COPIED != 0) {
                    self.report.corruptions += 1;
                    self.say(format!(
                        "{} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}",
                        word(repair)
                    ));
                    if repair {
                        self.write_l1_entry(i, with_copied(e, rc == 1))?;
                    }
                }
            }
            self.check_l2_copied(l2, repair)?;
        }
        Ok(())
    }

    /// The stored refcount of the cluster at `offset`, if it can be read.
    fn refcount_at(&mut self, offset: u64) -> Option<u64> {
        let mut m = self.img.meta_mut();
        stored_refcount(&mut m, self.file, self.file_len, offset / self.cs).ok()
    }

    /// Sets active L1 entry `i` to `entry`, in memory and in the file.
    fn write_l1_entry(&mut self, i: usize, entry: u64) -> Outcome {
        let mut m = self.img.meta_mut();
        let at = m.header.l1_table_offset + i as u64 * 8;
        let written = m
            .check_write(self.file, at, 8, Target::L1)
            .map_err(Failed::from)
            .and_then(|()| {
                self.file
                    .write_at(&entry.to_be_bytes(), at)
                    .map_err(|e| Failed(strerror(&e)))
            });
        if let Err(f) = written {
            drop(m);
            self.report.check_errors += 1;
            return Err(f);
        }
        m.l1[i] = entry;
        drop(m);
        self.report.corruptions -= 1;
        self.report.corruptions_fixed += 1;
        Ok(())
    }

    /// Checks (and if `repair`, fixes) the COPIED flags of the L2 table at `l2`.
    fn check_l2_copied(&mut self, l2: u64, repair: bool) -> Outcome {
        let mut table = match self.read_u64s(l2, self.cs / 8) {
            Ok(t) => t,
            Err(e) => {
                self.say(format!("ERROR: Could not read L2 table: {}", strerror(&e)));
                self.report.check_errors += 1;
                return Err(Failed(strerror(&e)));
            }
        };
        let data_file = self.img.has_data_file();
        let mut dirty = 0;
        let extended = self.words == 2;
        for entry in table.chunks_exact_mut(self.words as usize) {
            let raw = &mut entry[0];
            let Kind::Allocated(host) = classify(*raw, self.bits, data_file, extended) else {
                continue;
            };
            let rc = match data_file {
                true => 1,
                false => match self.refcount_at(host) {
                    Some(rc) => rc,
                    None => continue,
                },
            };
            if (rc == 1) != (*raw & COPIED != 0) {
                self.report.corruptions += 1;
                self.say(format!(
                    "{} OFLAG_COPIED data cluster: l2_entry={:x} refcount={rc}",
                    word(repair),
                    *raw
                ));
                if repair {
                    *raw = with_copied(*raw, rc == 1);
                    dirty += 1;
                }
            }
        }
        if dirty > 0 {
            self.write_l2_table(l2, &table)?;
            self.report.corruptions -= dirty;
            self.report.corruptions_fixed += dirty;
        }
        Ok(())
    }

    /// Writes a repaired L2 table and drops its cached copy.
    fn write_l2_table(&mut self, l2: u64, table: &[u64]) -> Outcome {
        let mut m = self.img.meta_mut();
        if let Err(e) = m.check_write(self.file, l2, self.cs, Target::L2(l2)) {
            drop(m);
            if let Error::MarkedCorrupt(what) = &e {
                self.say_marked_corrupt(what);
            }
            self.say(
                "ERROR: Could not write L2 table; metadata overlap check failed: \
                 Input/output error",
            );
            self.report.check_errors += 1;
            return Err(Failed::eio());
        }
        m.forget_l2_table(l2);
        drop(m);
        if let Err(e) = self.file.write_at(&encode_u64_table(table), l2) {
            self.say(format!("ERROR: Could not write L2 table: {}", strerror(&e)));
            self.report.check_errors += 1;
            return Err(Failed(strerror(&e)));
        }
        Ok(())
    }
}

/// How a COPIED problem is introduced.
fn word(repair: bool) -> &'static str {
    match repair {
        true => "Repairing",
        false => "ERROR",
    }
}
