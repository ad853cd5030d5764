//! JSON printed the way qemu-img prints it: QEMU's QDict hash-bucket key order and
//! 4-space pretty printing.

use serde_json::Value;

/// QEMU's QDict bucket of a key (tdb_hash, then QDict's modulus).
fn bucket(key: &str) -> u32 {
    let mut h: u32 = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, c) in key.bytes().enumerate() {
        h = h.wrapping_add((c as u32) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(h).wrapping_add(12345) % 512
}

/// Orders `fields` (given in QAPI insertion order) as a QDict iterates them: by bucket, and
/// most recently inserted first within a bucket.
pub fn qdict_order(fields: Vec<(&'static str, Value)>) -> Vec<(&'static str, Value)> {
    let mut indexed: Vec<(usize, (&'static str, Value))> = fields.into_iter().enumerate().collect();
    indexed.sort_by(|(ia, (ka, _)), (ib, (kb, _))| bucket(ka).cmp(&bucket(kb)).then(ib.cmp(ia)));
    indexed.into_iter().map(|(_, f)| f).collect()
}

/// Pretty-prints an ordered object like QEMU's JSON writer.
pub fn print_object(fields: &[(&'static str, Value)], indent: usize, out: &mut String) {
    let pad = " ".repeat(indent + 4);
    out.push_str("{\n");
    for (i, (k, v)) in fields.iter().enumerate() {
        out.push_str(&format!("{pad}\"{k}\": {v}"));
        out.push_str(if i + 1 < fields.len() { ",\n" } else { "\n" });
    }
    out.push_str(&" ".repeat(indent));
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reproduces_qemu_img_check_key_order() {
        let fields = vec![
            ("filename", json!("q1.qcow2")),
            ("format", json!("qcow2")),
            ("check-errors", json!(0)),
            ("image-end-offset", json!(524288)),
            ("total-clusters", json!(1024)),
            ("allocated-clusters", json!(3)),
            ("fragmented-clusters", json!(1)),
            ("compressed-clusters", json!(1)),
        ];
        let mut out = String::new();
        print_object(&qdict_order(fields), 0, &mut out);
        let expected = "{\n    \"image-end-offset\": 524288,\n    \"compressed-clusters\": 1,\n    \"total-clusters\": 1024,\n    \"check-errors\": 0,\n    \"allocated-clusters\": 3,\n    \"filename\": \"q1.qcow2\",\n    \"format\": \"qcow2\",\n    \"fragmented-clusters\": 1\n}";
        assert_eq!(out, expected);
    }
}
