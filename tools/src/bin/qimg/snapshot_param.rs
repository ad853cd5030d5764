//! qemu-img's `-l SNAPSHOT_PARAM`: `snapshot.id=ID[,snapshot.name=NAME]` or a bare
//! ID_OR_NAME (an ID first, then a name).

use anyhow::bail;
use qcow2::SnapshotRef;

/// Parses the `-l` argument, if given.
pub fn parse_given(param: Option<&str>) -> anyhow::Result<Option<SnapshotRef>> {
    param.map(parse).transpose()
}

/// Parses a `-l` argument.
fn parse(param: &str) -> anyhow::Result<SnapshotRef> {
    if !param.starts_with("snapshot.") {
        return Ok(SnapshotRef::IdOrName(param.to_string()));
    }
    // Two error lines, as qemu-img prints them: the option's, then this one.
    let (id, name) = parse_opts(param).map_err(|e| {
        anyhow::anyhow!(
            "{e}\n{}: Failed in parsing snapshot param '{param}'",
            crate::progname()
        )
    })?;
    Ok(match (id, name) {
        (Some(id), Some(name)) => SnapshotRef::IdAndName { id, name },
        (Some(id), None) => SnapshotRef::Id(id),
        (None, Some(name)) => SnapshotRef::Name(name),
        (None, None) => bail!("snapshot_id and name are both NULL"),
    })
}

/// The `snapshot.id` and `snapshot.name` of a QemuOpts string: `key=value` pairs split at
/// single commas (`,,` is a comma in a value); a key alone means `key=on`; the last value wins.
fn parse_opts(s: &str) -> anyhow::Result<(Option<String>, Option<String>)> {
    let (mut id, mut name) = (None, None);
    let mut rest = s;
    while !rest.is_empty() {
        let key_end = rest.find(['=', ',']).unwrap_or(rest.len());
        let key = &rest[..key_end];
        rest = &rest[key_end..];
        let value = match rest.strip_prefix('=') {
            Some(v) => {
                let mut value = String::new();
                let mut chars = v.char_indices();
                rest = "";
                while let Some((i, c)) = chars.next() {
                    if c == ',' {
                        if v[i + 1..].starts_with(',') {
                            chars.next();
                        } else {
                            rest = &v[i..];
                            break;
                        }
                    }
                    value.push(c);
                }
                value
            }
            None => "on".to_string(),
        };
        rest = rest.strip_prefix(',').unwrap_or(rest);
        match key {
            "snapshot.id" => id = Some(value),
            "snapshot.name" => name = Some(value),
            k => bail!("Invalid parameter '{k}'"),
        }
    }
    Ok((id, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_opts_and_bare_names() {
        let p = |s: &str| parse(s).map_err(|e| format!("{e:#}"));
        assert_eq!(p("snap1"), Ok(SnapshotRef::IdOrName("snap1".into())));
        assert_eq!(p("snapshot.id=3"), Ok(SnapshotRef::Id("3".into())));
        assert_eq!(
            p("snapshot.name=a,,b,snapshot.id=1"),
            Ok(SnapshotRef::IdAndName {
                id: "1".into(),
                name: "a,b".into()
            })
        );
        assert_eq!(
            p("snapshot.name=x,snapshot.name=y"),
            Ok(SnapshotRef::Name("y".into()))
        );
        assert_eq!(p("snapshot.id"), Ok(SnapshotRef::Id("on".into())));
        assert_eq!(
            p("snapshot.foo=1"),
            Err(format!(
                "Invalid parameter 'snapshot.foo'\n{}: Failed in parsing snapshot param \
                 'snapshot.foo=1'",
                crate::progname()
            ))
        );
    }
}
