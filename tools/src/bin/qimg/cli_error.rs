//! Command-line errors in qemu-img's words. clap finds them; this module words them as
//! qemu-img's getopt and its per-subcommand argument checks do, so scripts that match
//! qemu-img's messages (and its exit code 1) work unchanged.

use clap::error::{ContextKind, ContextValue, ErrorKind};

use crate::progname;

/// Prints clap error `e` for command line `args` (program name first) as qemu-img would and
/// returns the exit code: 0 for `--help` and `--version`, 1 for every error.
pub fn report(e: &clap::Error, args: &[String]) -> u8 {
    if !e.use_stderr() {
        let _ = e.print();
        return 0;
    }
    let sub = args
        .get(1)
        .map(String::as_str)
        .filter(|a| !a.starts_with('-'));
    let (message, hint) = qemu_img_words(e, sub, args);
    errln!("{message}");
    if hint {
        match sub {
            Some(s) if e.kind() != ErrorKind::InvalidSubcommand => {
                errln!("Try '{} {s} --help' for more info", progname())
            }
            _ => errln!("Try '{} --help' for more info", progname()),
        }
    }
    1
}

/// The message line for `e` in subcommand `sub`, and whether qemu-img follows it with its
/// "Try ... --help" hint.
fn qemu_img_words(e: &clap::Error, sub: Option<&str>, args: &[String]) -> (String, bool) {
    // getopt names the subcommand in its own errors ("qemu-img info: ...").
    let getopt = match sub {
        Some(s) => format!("{} {s}", progname()),
        None => progname().to_owned(),
    };
    let arg = context(e, ContextKind::InvalidArg).unwrap_or_default();
    match e.kind() {
        ErrorKind::InvalidSubcommand => (
            format!(
                "{}: Command not found: {}",
                progname(),
                context(e, ContextKind::InvalidSubcommand).unwrap_or_default()
            ),
            true,
        ),
        ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            (format!("{}: Not enough arguments", progname()), true)
        }
        ErrorKind::UnknownArgument if arg.starts_with("--") => {
            // clap drops an "=value" part that getopt repeats.
            let prefix = format!("{arg}=");
            let given = args.iter().find(|a| a.starts_with(&prefix)).unwrap_or(&arg);
            (format!("{getopt}: unrecognized option '{given}'"), true)
        }
        ErrorKind::UnknownArgument if arg.len() > 1 && arg.starts_with('-') => {
            let letter = arg.chars().nth(1).unwrap_or('-');
            (format!("{getopt}: invalid option -- '{letter}'"), true)
        }
        ErrorKind::UnknownArgument => extra_argument(sub.unwrap_or_default(), &arg),
        ErrorKind::InvalidValue
            if context(e, ContextKind::InvalidValue).is_some_and(|v| v.is_empty()) =>
        {
            // clap names the option with its value placeholder: "-f <FORMAT>", and by its
            // long name when it has one. A value can only be missing at the end of the
            // command line: the last word tells which form was used.
            let mut option = arg.split(' ').next().unwrap_or_default().to_string();
            if let Some(last) = args.last().filter(|l| !l.starts_with("--")) {
                if let Some(letter) = last.chars().last().filter(|_| last.starts_with('-')) {
                    option = format!("-{letter}");
                }
            }
            match option.strip_prefix("--") {
                Some(_) => (
                    format!("{getopt}: option '{option}' requires an argument"),
                    true,
                ),
                None => (
                    format!(
                        "{getopt}: option requires an argument -- '{}'",
                        option.trim_start_matches('-')
                    ),
                    true,
                ),
            }
        }
        ErrorKind::ValueValidation if bad_value(e).is_some() => (
            format!("{}: {}", progname(), bad_value(e).unwrap_or_default()),
            true,
        ),
        ErrorKind::MissingRequiredArgument
        | ErrorKind::WrongNumberOfValues
        | ErrorKind::TooFewValues => missing_argument(sub.unwrap_or_default()),
        _ => {
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or_default();
            (
                format!("{}: {}", progname(), first.trim_start_matches("error: ")),
                true,
            )
        }
    }
}

/// qemu-img's message when subcommand `sub` lacks a file name (or size).
fn missing_argument(sub: &str) -> (String, bool) {
    let (text, hint) = match sub {
        "create" => ("Expecting image file name", true),
        "compare" => ("Expecting two image file names", true),
        "resize" => ("Expecting image file name and size", true),
        "convert" => ("Must specify image file name", false),
        "measure" => ("Either --size N or one filename must be specified.", false),
        "dd" => ("Must specify both input and output files", false),
        _ => ("Expecting one image file name", true),
    };
    (format!("{}: {text}", progname()), hint)
}

/// qemu-img's message when subcommand `sub` is given `arg` beyond its last operand.
fn extra_argument(sub: &str, arg: &str) -> (String, bool) {
    let name = progname();
    match sub {
        "create" => (format!("{name}: Unexpected argument: {arg}"), true),
        "resize" => (format!("{name}: Extra argument(s) in command line"), true),
        "measure" => (
            format!("{name}: At most one filename argument is allowed."),
            false,
        ),
        "dd" => (format!("{name}: unrecognized operand {arg}"), false),
        _ => missing_argument(sub),
    }
}

/// The words of a value refused in qemu-img's words (`crate::BadValue`), if `e` is one.
fn bad_value(e: &clap::Error) -> Option<String> {
    let source = std::error::Error::source(e)?;
    source
        .downcast_ref::<crate::BadValue>()
        .map(|b| b.0.clone())
}

/// The string clap recorded for `kind`, if any.
fn context(e: &clap::Error, kind: ContextKind) -> Option<String> {
    match e.get(kind)? {
        ContextValue::String(s) => Some(s.clone()),
        ContextValue::Strings(v) => v.first().cloned(),
        _ => None,
    }
}
