//! The snapshot table's part of a check, as QEMU's (`qcow2_check_read_snapshot_table`,
//! `qcow2_check_fix_snapshot_table`): an image opened for a check has not read its table;
//! the check reads it here, reports what is wrong with it, repairs what `-r all` may (extra
//! data cut, snapshots past the limits dropped, entries without their full extra data
//! rewritten) and rewrites the table once the refcounts are checked.

use crate::engine::read_snapshot_table;
use crate::error::Error;
use crate::format::snapshot::{self, PlaceProblem, MAX_SNAPSHOTS};

use super::{strerror, Checker, Failed, Repair};

type Outcome = std::result::Result<(), Failed>;

/// What the snapshot table's check found; QEMU counts it apart from the refcounts' and
/// adds the two at the end.
#[derive(Debug, Default)]
pub(super) struct TableFindings {
    pub corruptions: u64,
    pub corruptions_fixed: u64,
    pub check_errors: u64,
}

impl Checker<'_> {
    /// Reads the snapshot table for the check, reporting (and with `mode`, repairing) what
    /// keeps it from being read as it is; the snapshots read are the ones counted.
    pub(super) fn read_snapshot_table(&mut self, mode: Repair) -> Outcome {
        let header = self.img.header();
        let offset = header.snapshots_offset;
        let mut count = header.nb_snapshots;
        let mut reduced = 0;
        if count > MAX_SNAPSHOTS && mode.errors() {
            self.say(format!(
                "Discarding {} overhanging snapshots",
                count - MAX_SNAPSHOTS
            ));
            reduced = count - MAX_SNAPSHOTS;
            count = MAX_SNAPSHOTS;
        }
        match snapshot::place_problem(offset, count, self.cs) {
            Some(PlaceProblem::TooLarge) => {
                self.snapshot_findings.check_errors += 1;
                self.report_error("ERROR snapshot table too large".into());
                self.say(format!(
                    "You can force-remove all {} overhanging snapshots with qemu-img check \
                     -r all",
                    count - MAX_SNAPSHOTS
                ));
                return Err(Failed("File too large".into()));
            }
            Some(PlaceProblem::OffsetInvalid) => {
                self.snapshot_findings.check_errors += 1;
                self.report_error("ERROR snapshot table offset invalid".into());
                return Err(Failed("Invalid argument".into()));
            }
            None => {}
        }
        let table = match read_snapshot_table(self.file, offset, count, mode.errors()) {
            Ok(table) => table,
            Err(e) => {
                self.snapshot_findings.check_errors += 1;
                self.report_error(format!("ERROR failed to read the snapshot table: {e}"));
                return Err(match e {
                    Error::Io { error, .. } => Failed(strerror(&error)),
                    _ => Failed("File too large".into()),
                });
            }
        };
        for line in &table.messages {
            self.say(line.clone());
        }
        let findings = &mut self.snapshot_findings;
        findings.corruptions += u64::from(table.extra_data_dropped);
        reduced += table.dropped;
        if reduced > 0 {
            // The refcounts are counted from the snapshots kept: the header says so first.
            let kept = table.snapshots.len() as u32;
            if let Err(e) = self.write_snapshot_count(kept) {
                self.snapshot_findings.check_errors += 1;
                let why = strerror(&e);
                self.say(format!(
                    "ERROR failed to update the snapshot count in the image header: {why}"
                ));
                return Err(Failed(why));
            }
            self.snapshot_findings.corruptions_fixed += u64::from(reduced);
        }
        if self.img.header().version >= 3 {
            for (i, s) in table.snapshots.iter().enumerate() {
                // Version 3 entries must hold at least the VM state and disk sizes.
                if s.disk_size.is_none() {
                    self.snapshot_findings.corruptions += 1;
                    let word = if mode.errors() { "Repairing" } else { "ERROR" };
                    self.say(format!("{word} snapshot table entry {i} is incomplete"));
                }
            }
        }
        let mut m = self.img.meta_mut();
        m.fixed.snapshot_table = (table.len > 0).then_some((offset, table.len as u64));
        m.fixed.snapshot_l1s = table
            .snapshots
            .iter()
            .map(|s| (s.l1_table_offset, u64::from(s.l1_size) * 8))
            .collect();
        drop(m);
        self.snapshots = table.snapshots;
        Ok(())
    }

    /// Writes the number of snapshots into the header, durably.
    fn write_snapshot_count(&mut self, count: u32) -> std::io::Result<()> {
        // The snapshot count is at byte 60 of the header.
        self.file.write_at(&count.to_be_bytes(), 60)?;
        self.file.flush()?;
        self.img.meta_mut().header.nb_snapshots = count;
        Ok(())
    }

    /// With `mode` repairing errors, writes the snapshot table anew when it had any: its
    /// entries as read, with their full extra data.
    pub(super) fn fix_snapshot_table(&mut self, mode: Repair) -> Outcome {
        let findings = &mut self.snapshot_findings;
        if findings.corruptions == 0 || !mode.errors() {
            return Ok(());
        }
        match self.img.rewrite_snapshot_table(&self.snapshots) {
            Ok(None) => {}
            Ok(Some(not_freed)) => {
                let why = match not_freed {
                    Error::Io { error, .. } => strerror(&error),
                    _ => "Invalid argument".into(),
                };
                self.say(format!("qcow2_free_clusters failed: {why}"));
            }
            Err(e) => {
                self.snapshot_findings.check_errors += 1;
                if let Error::MarkedCorrupt(what) = &e {
                    self.say_marked_corrupt(what);
                }
                let why = match e {
                    Error::MarkedCorrupt(_) => "Input/output error".into(),
                    e => Failed::from(e).0,
                };
                self.say(format!("ERROR failed to update snapshot table: {why}"));
                return Err(Failed(why));
            }
        }
        let findings = &mut self.snapshot_findings;
        findings.corruptions_fixed += findings.corruptions;
        findings.corruptions = 0;
        Ok(())
    }
}
