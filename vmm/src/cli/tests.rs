use super::*;
use crate::memory::{GIB, MIB};
use clap::error::ErrorKind;

fn parse(args: &[&str]) -> std::result::Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("vmm").chain(args.iter().copied()))
}

fn config(args: &[&str]) -> Result<VmConfig> {
    parse(args)
        .expect("clap rejected the arguments")
        .into_config()
}

fn clap_error(args: &[&str]) -> String {
    parse(args).unwrap_err().to_string()
}

fn disk(s: &str) -> Result<DiskConfig> {
    s.parse()
}

fn net(s: &str) -> Result<NetConfig> {
    s.parse()
}

fn invalid_value(key: &str, value: &str, reason: &str) -> Error {
    Error::InvalidValue {
        key: key.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

#[test]
fn kernel_alone_gives_the_defaults() {
    let c = config(&["--kernel", "vmlinux"]).unwrap();
    assert_eq!(
        c,
        VmConfig {
            kernel: "vmlinux".into(),
            initramfs: None,
            cmdline: DEFAULT_CMDLINE.into(),
            cpus: 1,
            memory: MemoryLayout::new(512 * MIB).unwrap(),
            hugepages: false,
            disks: vec![],
            nets: vec![],
            serial: SerialConfig::Stdio,
            api_socket: None,
        }
    );
}

#[test]
fn kernel_is_required() {
    assert_eq!(
        parse(&["--memory", "1G"]).unwrap_err().kind(),
        ErrorKind::MissingRequiredArgument
    );
    assert!(clap_error(&["--kernel", ""]).contains("expected a file path"));
}

#[test]
fn full_command_line() {
    let c = config(&[
        "--kernel",
        "/boot/vmlinux",
        "--initramfs",
        "/boot/initrd.cpio",
        "--cmdline",
        "console=ttyS0 quiet",
        "--cpus",
        "2",
        "--memory",
        "4G",
        "--disk",
        "socket=/run/blk0.sock,num_queues=2,queue_size=256,readonly",
        "--disk",
        "path=disk.qcow2,format=qcow2",
        "--net",
        "socket=/run/net0.sock,mac=52:54:00:12:34:56,num_queues=4",
        "--net",
        "tap=tap0",
        "--serial",
        "file=/tmp/console.log",
        "--api-socket",
        "/run/vmm.sock",
    ])
    .unwrap();
    assert_eq!(c.initramfs, Some("/boot/initrd.cpio".into()));
    assert_eq!(c.cmdline, "console=ttyS0 quiet");
    assert_eq!(c.cpus, 2);
    assert_eq!(c.memory.size(), 4 * GIB);
    assert_eq!(
        c.disks,
        vec![
            DiskConfig {
                backend: DiskBackend::Socket("/run/blk0.sock".into()),
                num_queues: 2,
                queue_size: 256,
                readonly: true,
            },
            DiskConfig {
                backend: DiskBackend::Image {
                    path: "disk.qcow2".into(),
                    format: Some(ImageFormat::Qcow2),
                },
                num_queues: 1,
                queue_size: DEFAULT_DISK_QUEUE_SIZE,
                readonly: false,
            },
        ]
    );
    assert_eq!(
        c.nets,
        vec![
            NetConfig {
                backend: NetBackend::Socket("/run/net0.sock".into()),
                mac: Some(MacAddress::new([0x52, 0x54, 0, 0x12, 0x34, 0x56])),
                num_queues: 4,
                queue_size: DEFAULT_NET_QUEUE_SIZE,
            },
            NetConfig {
                backend: NetBackend::Tap {
                    name: "tap0".into(),
                    mtu: None,
                    host_ip: None,
                },
                mac: None,
                num_queues: 2,
                queue_size: DEFAULT_NET_QUEUE_SIZE,
            },
        ]
    );
    assert_eq!(c.nets[0].queue_pairs(), 2);
    assert_eq!(c.serial, SerialConfig::File("/tmp/console.log".into()));
    assert_eq!(c.api_socket, Some("/run/vmm.sock".into()));
}

#[test]
fn cpus() {
    assert_eq!(parse_cpus("1").unwrap(), 1);
    assert_eq!(parse_cpus("254").unwrap(), 254);
    for bad in ["0", "255", "256", "1000"] {
        assert_eq!(
            parse_cpus(bad).unwrap_err().to_string(),
            format!("'{bad}': the number of vCPUs must be 1..=254")
        );
    }
    for bad in ["", "two", "-1", "1.5"] {
        assert!(matches!(parse_cpus(bad), Err(Error::InvalidNumber { .. })));
    }
    let text = clap_error(&["--kernel", "k", "--cpus", "0"]);
    assert!(
        text.contains("the number of vCPUs must be 1..=254"),
        "{text}"
    );
}

#[test]
fn memory_sizes() {
    let mem = |s| parse(&["--kernel", "k", "--memory", s]).map(|c| c.memory.size());
    assert_eq!(mem("512M").unwrap(), 512 * MIB);
    assert_eq!(mem("2G").unwrap(), 2 * GIB);
    assert_eq!(mem("1073741824").unwrap(), GIB);
    assert_eq!(mem("65536K").unwrap(), 64 * MIB);
    let text = clap_error(&["--kernel", "k", "--memory", "1.5G"]);
    assert!(text.contains("invalid size '1.5G'"), "{text}");
    let text = clap_error(&["--kernel", "k", "--memory", "1M"]);
    assert!(
        text.contains("smaller than the minimum of 32 MiB"),
        "{text}"
    );
    let text = clap_error(&["--kernel", "k", "--memory", "1000000"]);
    assert!(
        text.contains("not a multiple of the 4 KiB page size"),
        "{text}"
    );
}

#[test]
fn cmdline_length() {
    let longest = "x".repeat(MAX_CMDLINE_LEN);
    assert_eq!(parse_cmdline(&longest).unwrap(), longest);
    assert_eq!(
        parse_cmdline(&format!("{longest}y")).unwrap_err(),
        Error::CmdlineTooLong {
            len: 2048,
            max: 2047
        }
    );
    assert_eq!(parse_cmdline("").unwrap(), "");
}

#[test]
fn disk_socket_mode() {
    assert_eq!(
        disk("socket=/s").unwrap(),
        DiskConfig {
            backend: DiskBackend::Socket("/s".into()),
            num_queues: 1,
            queue_size: DEFAULT_DISK_QUEUE_SIZE,
            readonly: false,
        }
    );
    assert!(disk("socket=/s,readonly=on").unwrap().readonly);
    assert!(!disk("socket=/s,readonly=off").unwrap().readonly);
}

#[test]
fn disk_image_mode() {
    assert_eq!(
        disk("path=/img/a.raw,format=raw,readonly,num_queues=4").unwrap(),
        DiskConfig {
            backend: DiskBackend::Image {
                path: "/img/a.raw".into(),
                format: Some(ImageFormat::Raw),
            },
            num_queues: 4,
            queue_size: DEFAULT_DISK_QUEUE_SIZE,
            readonly: true,
        }
    );
    assert_eq!(
        disk("path=a.img").unwrap().backend,
        DiskBackend::Image {
            path: "a.img".into(),
            format: None
        }
    );
    // Paths may contain '='.
    assert_eq!(
        disk("path=/x/a=b.qcow2").unwrap().backend,
        DiskBackend::Image {
            path: "/x/a=b.qcow2".into(),
            format: None
        }
    );
}

#[test]
fn disk_errors_are_precise() {
    let cases: &[(&str, Error)] = &[
        ("", Error::EmptyOptionList),
        (
            "socket=/s,,readonly",
            Error::EmptyEntry {
                input: "socket=/s,,readonly".into(),
            },
        ),
        (
            "socket=/s,queues=2",
            Error::UnknownKey {
                key: "queues".into(),
                valid: "socket, path, format, num_queues, queue_size, readonly".into(),
            },
        ),
        (
            "socket=/a,socket=/b",
            Error::DuplicateKey {
                key: "socket".into(),
            },
        ),
        (
            "socket",
            Error::MissingValue {
                key: "socket".into(),
            },
        ),
        ("path=", Error::MissingValue { key: "path".into() }),
        (
            "socket=/s,num_queues",
            Error::MissingValue {
                key: "num_queues".into(),
            },
        ),
        (
            "socket=/s,path=/i",
            Error::ConflictingKeys {
                first: "socket",
                second: "path",
            },
        ),
        (
            "socket=/s,format=qcow2",
            Error::ConflictingKeys {
                first: "socket",
                second: "format",
            },
        ),
        (
            "readonly",
            Error::MissingKey {
                expected: "socket=PATH or path=IMAGE",
            },
        ),
        (
            "path=/i,format=vmdk",
            invalid_value("format", "vmdk", "expected raw or qcow2"),
        ),
        (
            "socket=/s,num_queues=0",
            invalid_value("num_queues", "0", "queues must be 1..=256"),
        ),
        (
            "socket=/s,num_queues=257",
            invalid_value("num_queues", "257", "queues must be 1..=256"),
        ),
        (
            "socket=/s,num_queues=-1",
            invalid_value("num_queues", "-1", "expected a decimal number"),
        ),
        (
            "socket=/s,num_queues=99999999999999999999",
            invalid_value(
                "num_queues",
                "99999999999999999999",
                "number too large to fit in target type",
            ),
        ),
        (
            "socket=/s,queue_size=100",
            invalid_value(
                "queue_size",
                "100",
                "must be a power of two between 1 and 32768",
            ),
        ),
        (
            "socket=/s,queue_size=65536",
            invalid_value(
                "queue_size",
                "65536",
                "must be a power of two between 1 and 32768",
            ),
        ),
        (
            "socket=/s,readonly=maybe",
            invalid_value("readonly", "maybe", "expected on, off, true or false"),
        ),
    ];
    for (input, expected) in cases {
        assert_eq!(&disk(input).unwrap_err(), expected, "{input:?}");
    }
}

#[test]
fn disk_socket_path_must_fit_sockaddr_un() {
    let long = format!("/{}", "s".repeat(cowbird_daemon::socket::MAX_PATH_LEN));
    assert_eq!(
        disk(&format!("socket={long}")).unwrap_err(),
        invalid_value(
            "socket",
            &long,
            "108 bytes long; unix socket paths hold at most 107"
        )
    );
}

#[test]
fn clap_names_the_option_in_list_errors() {
    let text = clap_error(&["--kernel", "k", "--disk", "socket=/s,bogus=1"]);
    assert!(text.contains("--disk <OPTIONS>"), "{text}");
    assert!(text.contains("unknown key 'bogus'"), "{text}");
    let text = clap_error(&["--kernel", "k", "--net", "socket=/s,tap=t"]);
    assert!(text.contains("--net <OPTIONS>"), "{text}");
    assert!(
        text.contains("'socket' and 'tap' cannot be used together"),
        "{text}"
    );
}

#[test]
fn net_modes() {
    assert_eq!(
        net("tap=tap0,mac=52:54:00:00:00:01,mtu=9000,ip=10.0.0.1/24,num_queues=8,queue_size=1024")
            .unwrap(),
        NetConfig {
            backend: NetBackend::Tap {
                name: "tap0".into(),
                mtu: Some(9000),
                host_ip: Some("10.0.0.1/24".into()),
            },
            mac: Some(MacAddress::new([0x52, 0x54, 0, 0, 0, 1])),
            num_queues: 8,
            queue_size: 1024,
        }
    );
    let n = net("socket=/run/n.sock").unwrap();
    assert_eq!(n.backend, NetBackend::Socket("/run/n.sock".into()));
    assert_eq!(n.num_queues, 2);
    assert_eq!(n.queue_pairs(), 1);
    assert_eq!(n.mac, None);
}

#[test]
fn net_errors_are_precise() {
    let cases: &[(&str, Error)] = &[
        (
            "socket=/s,tap=t",
            Error::ConflictingKeys {
                first: "socket",
                second: "tap",
            },
        ),
        (
            "socket=/s,mtu=1500",
            Error::ConflictingKeys {
                first: "socket",
                second: "mtu",
            },
        ),
        (
            "mac=52:54:00:00:00:01",
            Error::MissingKey {
                expected: "socket=PATH or tap=NAME",
            },
        ),
        (
            "tap=t,path=/x",
            Error::UnknownKey {
                key: "path".into(),
                valid: "socket, tap, mac, mtu, ip, num_queues, queue_size".into(),
            },
        ),
        (
            "tap=t,mac=52:54:00:00:00",
            invalid_value("mac", "52:54:00:00:00", "expected six ':'-separated octets"),
        ),
        (
            "tap=t,mac=ff:ff:ff:ff:ff:ff",
            invalid_value(
                "mac",
                "ff:ff:ff:ff:ff:ff",
                "it is a multicast address (lowest bit of the first octet set)",
            ),
        ),
        (
            "tap=t,num_queues=3",
            invalid_value(
                "num_queues",
                "3",
                "must be even: it counts rx and tx queues, 2 per queue pair",
            ),
        ),
        (
            "tap=t,num_queues=1",
            invalid_value("num_queues", "1", "queues must be 2..=512"),
        ),
        (
            "tap=t,num_queues=514",
            invalid_value("num_queues", "514", "queues must be 2..=512"),
        ),
        (
            "tap=t,mtu=67",
            invalid_value("mtu", "67", "MTU must be 68..=65535"),
        ),
        (
            "tap=t,mtu=65536",
            invalid_value("mtu", "65536", "MTU must be 68..=65535"),
        ),
        (
            "tap=a/b",
            invalid_value("tap", "a/b", "'/', ':' and whitespace are not allowed"),
        ),
        (
            "tap=sixteen-chars-xy",
            invalid_value("tap", "sixteen-chars-xy", "longer than 15 bytes"),
        ),
        ("tap=", Error::MissingValue { key: "tap".into() }),
    ];
    for (input, expected) in cases {
        assert_eq!(&net(input).unwrap_err(), expected, "{input:?}");
    }
}

#[test]
fn serial_modes() {
    assert_eq!(
        "stdio".parse::<SerialConfig>().unwrap(),
        SerialConfig::Stdio
    );
    assert_eq!("off".parse::<SerialConfig>().unwrap(), SerialConfig::Off);
    assert_eq!(
        "file=/var/log/c.log".parse::<SerialConfig>().unwrap(),
        SerialConfig::File("/var/log/c.log".into())
    );
    assert_eq!(
        "file=".parse::<SerialConfig>().unwrap_err(),
        Error::MissingValue { key: "file".into() }
    );
    for bad in ["", "tty", "Stdio", "file", "pty"] {
        assert_eq!(
            bad.parse::<SerialConfig>().unwrap_err(),
            Error::InvalidSerial { input: bad.into() }
        );
    }
    let text = clap_error(&["--kernel", "k", "--serial", "tty"]);
    assert!(
        text.contains("invalid serial mode 'tty' (expected stdio, file=PATH or off)"),
        "{text}"
    );
}

#[test]
fn api_socket_path() {
    let text = clap_error(&["--kernel", "k", "--api-socket", ""]);
    assert!(text.contains("it is empty"), "{text}");
}

#[test]
fn a_socket_cannot_serve_two_users() {
    assert_eq!(
        config(&[
            "--kernel",
            "k",
            "--disk",
            "socket=/s1",
            "--disk",
            "socket=/s1",
        ])
        .unwrap_err()
        .to_string(),
        "socket '/s1' is used by both --disk #1 and --disk #2"
    );
    assert_eq!(
        config(&["--kernel", "k", "--disk", "socket=/s", "--net", "socket=/s"]).unwrap_err(),
        Error::DuplicateSocket {
            path: "/s".into(),
            first: "--disk #1".into(),
            second: "--net #1".into(),
        }
    );
    assert_eq!(
        config(&["--kernel", "k", "--api-socket", "/s", "--net", "socket=/s"]).unwrap_err(),
        Error::DuplicateSocket {
            path: "/s".into(),
            first: "--api-socket".into(),
            second: "--net #1".into(),
        }
    );
}

#[test]
fn taps_and_macs_must_be_unique() {
    assert_eq!(
        config(&["--kernel", "k", "--net", "tap=t0", "--net", "tap=t0"]).unwrap_err(),
        Error::DuplicateTap {
            name: "t0".into(),
            first: "--net #1".into(),
            second: "--net #2".into(),
        }
    );
    // Templates are numbered by the kernel, so they may repeat.
    assert!(config(&["--kernel", "k", "--net", "tap=t%d", "--net", "tap=t%d"]).is_ok());
    assert_eq!(
        config(&[
            "--kernel",
            "k",
            "--net",
            "tap=t0,mac=52:54:00:00:00:01",
            "--net",
            "socket=/s,mac=52:54:00:00:00:01",
        ])
        .unwrap_err(),
        Error::DuplicateMac {
            mac: "52:54:00:00:00:01".into(),
            first: "--net #1".into(),
            second: "--net #2".into(),
        }
    );
}

#[test]
fn the_queues_of_all_devices_must_fit_kvms_doorbells() {
    let nic = "tap=t%d,num_queues=512";
    assert!(config(&[
        "--kernel",
        "k",
        "--net",
        nic,
        "--disk",
        "socket=/d,num_queues=256"
    ])
    .is_ok());
    assert_eq!(
        config(&["--kernel", "k", "--net", nic, "--net", nic]).unwrap_err(),
        Error::TooManyQueues {
            queues: 1026,
            max: MAX_DOORBELLS,
        }
    );
}

#[test]
fn only_read_only_disks_share_an_image() {
    assert!(config(&[
        "--kernel",
        "k",
        "--disk",
        "path=base.img,readonly",
        "--disk",
        "path=base.img,readonly",
    ])
    .is_ok());
    for (a, b) in [
        ("path=base.img", "path=base.img,readonly"),
        ("path=base.img,readonly", "path=base.img"),
        ("path=base.img", "path=base.img"),
    ] {
        assert_eq!(
            config(&["--kernel", "k", "--disk", a, "--disk", b]).unwrap_err(),
            Error::SharedWritableImage {
                path: "base.img".into(),
                first: "--disk #1".into(),
                second: "--disk #2".into(),
            },
            "{a} / {b}"
        );
    }
}

#[test]
fn hugepages_need_whole_huge_pages() {
    assert!(
        config(&["--kernel", "k", "--memory", "1G", "--hugepages"])
            .unwrap()
            .hugepages
    );
    let err = config(&["--kernel", "k", "--memory", "33M", "--hugepages"]).unwrap_err();
    assert!(err.to_string().contains("multiple of 2 MiB"), "{err}");
}
