//! The transport driven as a guest driver would, against a fake backend (see
//! [`crate::virtio::fake_backend`]) in a real KVM VM.

use std::time::{Duration, Instant};
use vhost::vhost_user::message::FrontendReq;

use vm_memory::GuestMemoryBackend;

use super::*;
use crate::memory::{MemoryLayout, MIB};
use crate::virtio::config_space::VIRTIO_BLK_F_CONFIG_WCE as WCE;
use crate::virtio::fake_backend::{Behaviour, ConfigReply, FakeBackend};
use crate::vm::Vm;

const FLUSH: u64 = 1 << 9;
const BAR: u32 = 0xc000_0000;
const DESC: u64 = 0x20_0000;
const AVAIL: u64 = 0x21_0000;
const USED: u64 = 0x22_0000;
/// The device's MSI-X vectors as the driver assigns them: queue 0, then configuration.
const QUEUE_VECTOR: u16 = 0;
const CONFIG_VECTOR: u16 = 1;
/// Offset of virtio-blk's `writeback` byte.
const WRITEBACK: u64 = DEVICE_OFFSET + 0x20;

/// A VM with one virtio-blk device on a fake backend.
struct Rig {
    vm: Vm,
    backend: FakeBackend,
    device: VirtioPciDevice,
}

impl Rig {
    fn new(behaviour: Behaviour) -> Self {
        Self::try_with_queues(behaviour, 1).expect("device")
    }

    fn try_with_queues(behaviour: Behaviour, queues: u16) -> std::io::Result<Self> {
        Self::try_device(DeviceType::Block, behaviour, queues)
    }

    fn try_device(kind: DeviceType, behaviour: Behaviour, queues: u16) -> std::io::Result<Self> {
        let backend = FakeBackend::start(behaviour);
        let connection = connect(&backend).expect("connect to the fake backend");
        Self::attach(kind, backend, connection, queues)
    }

    /// A VM with a `kind` device with `queues` queues on `connection` to `backend`.
    fn attach(
        kind: DeviceType,
        backend: FakeBackend,
        connection: VhostUserConnection,
        queues: u16,
    ) -> std::io::Result<Self> {
        let vm = Vm::new(&MemoryLayout::new(64 * MIB).unwrap(), false).expect("VM");
        let router = Arc::new(IrqRouter::new(vm.fd().clone()));
        let mut device = VirtioPciDevice::new(
            kind,
            connection,
            QueueLayout {
                count: queues,
                size: 16,
            },
            BAR,
            vm.fd().clone(),
            router,
            vm.memory().clone(),
        )?;
        device.write_config(4, &[0x02, 0]); // memory space decoding on
        Ok(Self {
            vm,
            backend,
            device,
        })
    }

    fn write(&mut self, offset: u64, bytes: &[u8]) {
        self.device.write_bar(0, offset, bytes);
    }

    fn write8(&mut self, offset: u64, value: u8) {
        self.write(offset, &[value]);
    }

    fn write16(&mut self, offset: u64, value: u16) {
        self.write(offset, &value.to_le_bytes());
    }

    fn write32(&mut self, offset: u64, value: u32) {
        self.write(offset, &value.to_le_bytes());
    }

    fn read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0xaa; len];
        self.device.read_bar(0, offset, &mut data);
        data
    }

    fn read16(&mut self, offset: u64) -> u16 {
        u16::from_le_bytes(self.read(offset, 2).try_into().unwrap())
    }

    fn status(&mut self) -> u8 {
        self.read(0x14, 1)[0]
    }

    /// What a driver does up to FEATURES_OK: negotiates `features` (and VERSION_1), routes
    /// configuration changes to [`CONFIG_VECTOR`] and sets queue 0 up.
    fn negotiate(&mut self, features: u64) {
        for status in [0, 1, 3] {
            self.write8(0x14, status);
        }
        self.write32(0x08, 0);
        self.write32(0x0c, features as u32);
        self.write32(0x08, 1);
        self.write32(0x0c, (features >> 32) as u32 | 1);
        self.write8(0x14, 0x0b);
        self.write16(0x10, CONFIG_VECTOR);
        self.enable_queue(0);
    }

    /// Sets queue `index` up (16 entries, the rings at DESC/AVAIL/USED, QUEUE_VECTOR) and
    /// enables it.
    fn enable_queue(&mut self, index: u16) {
        self.enable_queue_at(index, [DESC, AVAIL, USED]);
    }

    /// [`Self::enable_queue`] with the descriptor table, available and used rings at `rings`.
    fn enable_queue_at(&mut self, index: u16, rings: [u64; 3]) {
        self.write16(0x16, index);
        self.write16(0x18, 16);
        self.write16(0x1a, QUEUE_VECTOR);
        for (offset, addr) in [0x20, 0x28, 0x30].into_iter().zip(rings) {
            self.write32(offset, addr as u32);
            self.write32(offset + 4, (addr >> 32) as u32);
        }
        self.write16(0x1c, 1);
    }

    /// [`Self::negotiate`], then DRIVER_OK.
    fn start(&mut self, features: u64) {
        self.negotiate(features);
        self.write8(0x14, 0x0f);
    }

    /// Makes the fake backend hang up and hands the device its next connection, as the
    /// watcher thread does.
    fn reconnect(&mut self) -> anyhow::Result<()> {
        self.backend.hang_up();
        let connection = connect(&self.backend)?;
        self.device.reconnect(connection)
    }

    /// Detaches `vector`'s irqfd from KVM and returns it, so the test sees each signal the
    /// device or backend sends on it.
    fn observe(&self, vector: u16) -> EventFd {
        let irqfd = self.device.msix.irqfd(vector).expect("vector");
        self.vm
            .fd()
            .unregister_irqfd(irqfd, self.device.msix.gsi(vector))
            .expect("detach the irqfd");
        irqfd.try_clone().unwrap()
    }
}

fn connect(backend: &FakeBackend) -> Result<VhostUserConnection, super::super::VhostUserError> {
    VhostUserConnection::connect(&backend.socket, DeviceType::Block.config_size())
}

/// How many signals `fd` got since last asked.
fn signals(fd: &EventFd) -> u64 {
    fd.read().unwrap_or(0)
}

fn position(requests: &[FrontendReq], request: FrontendReq) -> usize {
    requests
        .iter()
        .position(|&r| r == request)
        .unwrap_or_else(|| panic!("no {request:?} in {requests:?}"))
}

/// The SET_CONFIG requests of connection `index` as (offset, payload).
fn config_writes(backend: &FakeBackend, index: usize) -> Vec<(u32, Vec<u8>)> {
    backend
        .messages(index)
        .iter()
        .filter(|m| m.request == FrontendReq::SET_CONFIG)
        .map(|m| (m.u32_at(0), m.body[12..].to_vec()))
        .collect()
}

#[test]
fn features_the_vmm_cannot_carry_are_not_offered_to_the_guest() {
    const RING_PACKED: u64 = 1 << 34;
    const LOG_ALL: u64 = 1 << 26;
    const ACCESS_PLATFORM: u64 = 1 << 33;
    let mut rig = Rig::new(Behaviour::block(
        FLUSH | RING_PACKED | LOG_ALL | ACCESS_PLATFORM,
        1,
    ));
    let mut offered = 0u64;
    for select in 0..2u32 {
        rig.write32(0x00, select);
        let word = u32::from_le_bytes(rig.read(0x04, 4).try_into().unwrap());
        offered |= u64::from(word) << (32 * select);
    }
    assert_eq!(offered, FLUSH | 1 << 32, "{offered:#x}");
}

#[test]
fn a_config_vector_past_the_table_reads_back_as_no_vector() {
    let mut rig = Rig::new(Behaviour::block(0, 1));
    rig.write16(0x10, CONFIG_VECTOR);
    assert_eq!(rig.read16(0x10), CONFIG_VECTOR);
    rig.write16(0x10, 2);
    assert_eq!(rig.read16(0x10), NO_VECTOR);
}

#[test]
fn turning_bus_mastering_off_stops_a_running_device_until_a_reset() {
    let mut rig = Rig::new(Behaviour::block(0, 1));
    rig.device.write_config(4, &[0x06, 0]); // memory space and bus master on
    rig.start(0);
    rig.device.write_config(4, &[0x02, 0]);
    let stops = rig.backend.wait_for(0, FrontendReq::GET_VRING_BASE);
    assert_eq!(stops.iter().map(|m| m.u32_at(0)).collect::<Vec<_>>(), [0]);
    assert_eq!(rig.status(), 0x0f | STATUS_NEEDS_RESET);
    // Turned on again, the device stays stopped until the driver resets it; then it starts.
    rig.device.write_config(4, &[0x06, 0]);
    rig.write8(0x14, 0x0f);
    assert_eq!(rig.status(), 0x0f | STATUS_NEEDS_RESET);
    rig.start(0);
    assert_eq!(rig.status(), 0x0f);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.backend.wait_for(0, FrontendReq::SET_VRING_KICK).len() < 2 {
        assert!(Instant::now() < deadline, "the queue was not started again");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn only_a_reset_clears_driver_ok_and_needs_reset() {
    // ACKNOWLEDGE | DRIVER | FEATURES_OK, then DRIVER_OK: the device starts once.
    assert_eq!(next_status(0x0b, 0x0f), (0x0f, true));
    // The driver clears DRIVER_OK: it stays (a later reset must stop the backend), and
    // setting it again does not start the device a second time.
    assert_eq!(next_status(0x0f, 0x0b), (0x0f, false));
    assert_eq!(next_status(0x0f, 0x0f), (0x0f, false));
    // Other bits as written.
    assert_eq!(next_status(0x0f, 0x8f), (0x8f, false));
    // DEVICE_NEEDS_RESET: the driver can neither set nor clear it, and it keeps the device
    // from starting.
    assert_eq!(next_status(0x0b, 0x4b), (0x0b, false));
    assert_eq!(next_status(0x4b, 0x0f), (0x4f, false));
}

#[test]
fn guest_config_writes_reach_the_backend_only_for_wce_with_config_wce() {
    let mut rig = Rig::new(Behaviour::block(FLUSH | WCE, 1));
    rig.start(FLUSH | WCE);
    rig.write32(DEVICE_OFFSET, 0); // capacity
    rig.write8(WRITEBACK + 1, 0); // unused byte after writeback
    rig.write32(WRITEBACK, 0); // writeback and the next three bytes
    rig.write8(DEVICE_OFFSET + 0x800, 0); // past the space
    assert_eq!(config_writes(&rig.backend, 0), vec![]);
    rig.write8(WRITEBACK, 0);
    assert_eq!(config_writes(&rig.backend, 0), vec![(0x20, vec![0])]);
    assert_eq!(rig.read(WRITEBACK, 1), [0]);
    assert_eq!(rig.read(DEVICE_OFFSET, 4), 2048u32.to_le_bytes());
    assert_eq!(rig.backend.connections(), 1, "the backend hung up");

    // A driver that did not negotiate CONFIG_WCE writes nothing.
    let mut rig = Rig::new(Behaviour::block(FLUSH | WCE, 1));
    rig.start(FLUSH);
    rig.write8(WRITEBACK, 0);
    assert_eq!(config_writes(&rig.backend, 0), vec![]);
    assert_eq!(rig.read(WRITEBACK, 1), [1]);
}

#[test]
fn config_reads_are_served_without_the_backend() {
    let mut rig = Rig::new(Behaviour::block(FLUSH, 1));
    // The backend stops answering; reads still do, with what it said at connect.
    rig.backend
        .set_behaviour(|b| b.config_reply = ConfigReply::Silent);
    for _ in 0..3 {
        assert_eq!(rig.read(DEVICE_OFFSET, 4), 2048u32.to_le_bytes());
        assert_eq!(rig.read(DEVICE_OFFSET + 0x100, 4), [0; 4]);
    }
    let fetches = rig
        .backend
        .requests(0)
        .iter()
        .filter(|&&r| r == FrontendReq::GET_CONFIG)
        .count();
    assert_eq!(fetches, 1, "one GET_CONFIG, at connect");
}

#[test]
fn a_backend_whose_config_cannot_be_read_is_refused_at_connect() {
    for (reply, reason) in [
        (ConfigReply::Error, "the backend reported an error"),
        (ConfigReply::TooLong, "a reply of 80 bytes; expected 72"),
    ] {
        let mut behaviour = Behaviour::block(0, 1);
        behaviour.config_reply = reply;
        let backend = FakeBackend::start(behaviour);
        let e = connect(&backend)
            .err()
            .expect("connect must fail")
            .to_string();
        assert!(
            e.contains("cannot read the device configuration (GET_CONFIG)") && e.contains(reason),
            "{reply:?}: {e}"
        );
    }
}

#[test]
fn a_reset_restores_the_backends_write_cache_setting() {
    let mut rig = Rig::new(Behaviour::block(FLUSH | WCE, 1));
    rig.start(FLUSH | WCE);
    rig.write8(WRITEBACK, 0);
    rig.write8(0x14, 0);
    assert_eq!(
        config_writes(&rig.backend, 0),
        vec![(0x20, vec![0]), (0x20, vec![1])]
    );
    assert_eq!(rig.read(WRITEBACK, 1), [1]);
    // Nothing to replay at the next start.
    rig.start(FLUSH | WCE);
    assert_eq!(config_writes(&rig.backend, 0).len(), 2);
}

#[test]
fn the_guests_writethrough_setting_is_replayed_to_a_new_backend_before_its_queues() {
    let mut rig = Rig::new(Behaviour::block(FLUSH | WCE, 1));
    rig.start(FLUSH | WCE);
    rig.write8(WRITEBACK, 0);
    rig.reconnect().unwrap();
    assert_eq!(config_writes(&rig.backend, 1), vec![(0x20, vec![0])]);
    let requests = rig.backend.requests(1);
    let replayed = position(&requests, FrontendReq::SET_CONFIG);
    assert!(position(&requests, FrontendReq::SET_FEATURES) < replayed);
    assert!(replayed < position(&requests, FrontendReq::SET_VRING_KICK));
    // The new backend said writeback; the guest still sees its writethrough.
    assert_eq!(rig.read(WRITEBACK, 1), [0]);
}

#[test]
fn a_wce_write_before_driver_ok_is_kept_and_written_at_the_start() {
    let mut rig = Rig::new(Behaviour::block(FLUSH | WCE, 1));
    rig.negotiate(FLUSH | WCE);
    rig.write8(WRITEBACK, 0);
    assert_eq!(config_writes(&rig.backend, 0), vec![]);
    assert_eq!(rig.read(WRITEBACK, 1), [0]);
    rig.write8(0x14, 0x0f);
    assert_eq!(config_writes(&rig.backend, 0), vec![(0x20, vec![0])]);
}

#[test]
fn a_reset_of_a_device_never_started_sends_its_backend_no_configuration() {
    let mut rig = Rig::new(Behaviour::block(FLUSH | WCE, 1));
    rig.negotiate(FLUSH | WCE);
    rig.write8(WRITEBACK, 0);
    rig.write8(0x14, 0);
    // The backend never had the guest's features or its write: nothing to put back.
    assert_eq!(config_writes(&rig.backend, 0), vec![]);
    assert_eq!(rig.read(WRITEBACK, 1), [1]);
    rig.start(FLUSH | WCE);
    assert_eq!(config_writes(&rig.backend, 0), vec![]);
    assert_eq!(rig.status(), 0x0f);
}

#[test]
fn rings_out_of_place_are_refused_before_the_backend_sees_them() {
    let end = 64 * MIB;
    for rings in [
        [DESC + 8, AVAIL, USED],  // descriptor table not 16-byte aligned
        [DESC, AVAIL + 1, USED],  // available ring not 2-byte aligned
        [DESC, AVAIL, USED + 2],  // used ring not 4-byte aligned
        [end - 128, AVAIL, USED], // 256-byte table past the end of RAM
        [DESC, AVAIL, end - 64],  // 134-byte used ring past the end of RAM
    ] {
        let mut rig = Rig::new(Behaviour::block(0, 1));
        for status in [0, 1, 3] {
            rig.write8(0x14, status);
        }
        rig.write32(0x08, 1);
        rig.write32(0x0c, 1);
        rig.write8(0x14, 0x0b);
        rig.write16(0x10, CONFIG_VECTOR);
        rig.enable_queue_at(0, rings);
        rig.write8(0x14, 0x0f);
        assert_eq!(rig.status(), 0x4f, "{rings:x?}");
        let requests = rig.backend.requests(0);
        assert!(
            !requests.contains(&FrontendReq::SET_VRING_ADDR),
            "{rings:x?}: {requests:?}"
        );
    }
}

/// Log lines written to a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_guest_restarting_a_device_whose_backend_is_away_cannot_flood_the_log() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let mut rig = Rig::new(Behaviour::block(0, 1));
    rig.backend.hang_up();
    tracing::subscriber::with_default(subscriber, || {
        for _ in 0..200 {
            rig.start(0);
            rig.write8(0x14, 0);
        }
    });
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let count = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    // Logged at powers of two: 1, 2, 4, ..., 128.
    assert!((1..=8).contains(&count("backend away")), "{log}");
    assert!(
        (1..=8).contains(&count("stopping the backend's queues")),
        "{log}"
    );
}

#[test]
fn reset_stops_a_queue_whose_enable_the_driver_cleared_after_driver_ok() {
    let mut rig = Rig::new(Behaviour::block(0, 1));
    rig.start(0);
    rig.write16(0x16, 0);
    rig.write16(0x1c, 0);
    assert_eq!(
        rig.read16(0x1c),
        1,
        "queue_enable changed on a running device"
    );
    rig.write8(0x14, 0);
    let stops = rig.backend.wait_for(0, FrontendReq::GET_VRING_BASE);
    assert_eq!(stops.iter().map(|m| m.u32_at(0)).collect::<Vec<_>>(), [0]);
}

#[test]
fn queue_setup_is_fixed_while_running_so_a_resume_uses_the_started_rings() {
    let mut rig = Rig::new(Behaviour::block(0, 1));
    rig.start(0);
    rig.write16(0x16, 0);
    rig.write32(0x30, 0xffff_fffe);
    rig.write32(0x34, 0xffff_ffff);
    rig.write16(0x18, 4);
    rig.write16(0x1a, NO_VECTOR);
    assert_eq!(rig.read(0x30, 8), USED.to_le_bytes());
    assert_eq!(rig.read16(0x1a), QUEUE_VECTOR);
    rig.reconnect().unwrap();
    // VhostUserVringAddr: index, flags, then the descriptor, used and available rings.
    let addr = &rig.backend.wait_for(1, FrontendReq::SET_VRING_ADDR)[0];
    let used = u64::from_le_bytes(addr.body[16..24].try_into().unwrap());
    let host = rig
        .vm
        .memory()
        .get_host_address(GuestAddress(USED))
        .unwrap();
    assert_eq!(used, host as u64);
    assert_eq!(
        rig.backend.wait_for(1, FrontendReq::SET_VRING_NUM)[0].u32_at(4),
        16
    );
}

#[test]
fn a_used_ring_at_the_top_of_the_address_space_has_no_index_address() {
    let mut q = Queue::new(16);
    q.used = u64::MAX - 1;
    assert_eq!(q.used_index(), None);
    q.used = USED;
    assert_eq!(q.used_index(), Some(GuestAddress(USED + 2)));
}

#[test]
fn a_device_started_while_its_backend_is_away_starts_when_it_is_back() {
    let mut rig = Rig::new(Behaviour::block(FLUSH | WCE, 1));
    rig.negotiate(FLUSH | WCE);
    rig.backend.hang_up();
    while !rig.device.backend.is_closed() {
        std::thread::yield_now();
    }
    rig.write8(0x14, 0x0f);
    rig.write8(WRITEBACK, 0);
    assert_eq!(rig.status(), 0x0f);
    let connection = connect(&rig.backend).unwrap();
    rig.device.reconnect(connection).unwrap();
    assert_eq!(config_writes(&rig.backend, 1), vec![(0x20, vec![0])]);
    let base = rig.backend.wait_for(1, FrontendReq::SET_VRING_BASE);
    assert_eq!((base[0].u32_at(0), base[0].u32_at(4)), (0, 0));
    rig.backend.wait_for(1, FrontendReq::SET_VRING_ENABLE);
}

#[test]
fn a_failed_start_needs_a_reset_and_is_not_retried_on_reconnect() {
    let mut behaviour = Behaviour::block(0, 1);
    behaviour.reject = vec![FrontendReq::SET_VRING_ADDR];
    let mut rig = Rig::new(behaviour);
    let config_irq = rig.observe(CONFIG_VECTOR);
    rig.start(0);
    assert_eq!(rig.status(), 0x4f);
    assert_eq!(signals(&config_irq), 1);
    // The backend closed the connection over the rings; the next one is not asked again.
    rig.backend.set_behaviour(|b| b.reject.clear());
    rig.reconnect().unwrap();
    let requests = rig.backend.requests(1);
    assert!(
        !requests.contains(&FrontendReq::SET_VRING_ADDR),
        "{requests:?}"
    );
    assert_eq!(rig.status(), 0x4f);
    // After a reset the driver can start the device again.
    rig.start(0);
    assert_eq!(rig.status(), 0x0f);
    rig.backend.wait_for(1, FrontendReq::SET_VRING_ENABLE);
}

#[test]
fn a_backend_that_stops_answering_is_cut_off_and_the_device_needs_a_reset() {
    let mut behaviour = Behaviour::block(0, 1);
    behaviour.ignore = vec![FrontendReq::SET_VRING_ADDR];
    let backend = FakeBackend::start(behaviour);
    let connection = VhostUserConnection::connect_with_timeout(
        &backend.socket,
        DeviceType::Block.config_size(),
        Duration::from_millis(300),
    )
    .unwrap();
    let mut rig = Rig::attach(DeviceType::Block, backend, connection, 1).unwrap();
    // DRIVER_OK waits for the backend's ack of SET_VRING_ADDR, which never comes: the
    // vCPU doing it must get it back, not hang.
    let (done, finished) = std::sync::mpsc::channel();
    let driver = std::thread::spawn(move || {
        let started = Instant::now();
        rig.start(0);
        let _ = done.send(started.elapsed());
        rig
    });
    let took = finished
        .recv_timeout(Duration::from_secs(20))
        .expect("DRIVER_OK hung on a backend that stopped answering");
    let mut rig = driver.join().unwrap();
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(rig.status(), 0x4f, "DRIVER_OK with NEEDS_RESET");
    assert!(
        rig.device.backend.is_closed(),
        "the connection was shut down"
    );
}

#[test]
fn a_supervised_backend_that_stops_answering_is_killed_and_started_again() {
    use crate::supervisor::tests::eventually;
    let supervisor = crate::supervisor::Supervisor::new().unwrap();
    // The supervised process counts its starts and then hangs.
    let starts = supervisor.socket_path("starts");
    let socket = supervisor.socket_path("hung");
    let script = format!(
        "echo >> {}; touch {}; exec sleep 1000",
        starts.display(),
        socket.display()
    );
    let health = supervisor
        .start("hung", "sh", vec!["-c".into(), script], &socket)
        .unwrap();
    // The device's connection stops being answered at DRIVER_OK; the watchdog cuts it off.
    let mut behaviour = Behaviour::block(0, 1);
    behaviour.ignore = vec![FrontendReq::SET_VRING_ADDR];
    let backend = FakeBackend::start(behaviour);
    let connection = VhostUserConnection::connect_with_timeout(
        &backend.socket,
        DeviceType::Block.config_size(),
        Duration::from_millis(300),
    )
    .unwrap();
    let mut rig = Rig::attach(DeviceType::Block, backend, connection, 1).unwrap();
    rig.start(0);
    assert_eq!(rig.status(), 0x4f, "DRIVER_OK with NEEDS_RESET");
    let Rig {
        vm: _vm,
        backend,
        device,
    } = rig;
    let device = Arc::new(std::sync::Mutex::new(device));
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    crate::virtio::reconnect::watch(
        device,
        DeviceType::Block,
        backend.socket.clone(),
        stopping.clone(),
        Some(health),
    )
    .unwrap();
    eventually("the hung backend was killed and started again", || {
        std::fs::read_to_string(&starts).is_ok_and(|s| s.lines().count() >= 2)
    });
    stopping.store(true, std::sync::atomic::Ordering::SeqCst);
}

#[test]
fn a_backend_that_cannot_resume_the_device_makes_it_need_a_reset() {
    type Change = fn(&mut Behaviour);
    let cases: [(&str, Change); 2] = [
        ("lacks features", |b| b.features = 0),
        ("serves fewer queues", |b| b.queues = 1),
    ];
    for (what, change) in cases {
        let mut rig = Rig::try_with_queues(Behaviour::block(FLUSH, 2), 2).unwrap();
        let config_irq = rig.observe(CONFIG_VECTOR);
        rig.start(FLUSH);
        assert_eq!(rig.status(), 0x0f, "{what}");
        rig.backend.set_behaviour(change);
        assert!(rig.reconnect().is_err(), "{what}");
        assert_eq!(rig.status(), 0x4f, "{what}");
        assert_eq!(signals(&config_irq), 1, "{what}");
    }
    let mut rig = Rig::new(Behaviour::block(0, 1));
    let config_irq = rig.observe(CONFIG_VECTOR);
    rig.start(0);
    rig.device.backend_lost();
    assert_eq!((rig.status(), signals(&config_irq)), (0x4f, 1));
}

#[test]
fn a_resume_kicks_and_signals_each_started_queue_once() {
    let mut rig = Rig::new(Behaviour::block(0, 1));
    let call = rig.observe(QUEUE_VECTOR);
    rig.start(0);
    assert_eq!(signals(&call), 0);
    rig.reconnect().unwrap();
    assert_eq!(signals(&call), 1);
    let kick = rig.backend.wait_for(1, FrontendReq::SET_VRING_KICK);
    let kick = kick[0].fd.as_ref().expect("kick fd");
    let mut count = [0u8; 8];
    std::io::Read::read_exact(&mut &**kick, &mut count).unwrap();
    assert_eq!(u64::from_le_bytes(count), 1);
}

#[test]
fn a_disk_has_the_queues_asked_for_at_most_max_queues() {
    let mut rig = Rig::try_with_queues(Behaviour::block(0, 4), 1).unwrap();
    assert_eq!(rig.read16(0x12), 1);
    // virtio-blk's num_queues says the same, whatever the backend's said.
    assert_eq!(rig.read16(DEVICE_OFFSET + 0x22), 1);
    assert!(Rig::try_with_queues(Behaviour::block(0, 2000), MAX_QUEUES).is_ok());
    let e = Rig::try_with_queues(Behaviour::block(0, 2000), MAX_QUEUES + 1)
        .err()
        .expect("1024 queues");
    assert!(e.to_string().contains("a device has 1 to 1023"), "{e}");
    let e = Rig::try_with_queues(Behaviour::block(0, 2), 3)
        .err()
        .expect("more queues than the backend");
    assert!(e.to_string().contains("serves (2)"), "{e}");
}

#[test]
fn a_device_whose_supervised_backend_is_given_up_needs_a_reset() {
    use crate::supervisor::tests::{eventually, start_dying_backend};
    let supervisor = crate::supervisor::Supervisor::new().unwrap();
    let health = start_dying_backend(&supervisor);
    let Rig {
        vm: _vm,
        backend,
        mut device,
    } = Rig::new(Behaviour::block(0, 1));
    let socket = backend.socket.clone();
    device.write_config(4, &[0x02, 0]);
    let device = Arc::new(std::sync::Mutex::new(device));
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    crate::virtio::reconnect::watch(
        device.clone(),
        DeviceType::Block,
        socket,
        stopping,
        Some(health),
    )
    .unwrap();
    // The backend goes away for good: its socket is gone, its supervisor gives up.
    drop(backend);
    let status = || {
        let mut status = [0u8];
        device.lock().unwrap().read_bar(0, 0x14, &mut status);
        status[0]
    };
    eventually("the device needs a reset", || {
        status() & STATUS_NEEDS_RESET != 0
    });
    // A reset clears it, and the next start, which nothing can serve, sets it again.
    let mut device_guard = device.lock().unwrap();
    for (offset, bytes) in [
        (0x14, &[0u8][..]),
        (0x14, &[1]),
        (0x14, &[3]),
        (0x08, &[1, 0, 0, 0]),
        (0x0c, &[1, 0, 0, 0]),
        (0x14, &[0x0b]),
    ] {
        device_guard.write_bar(0, offset, bytes);
    }
    drop(device_guard);
    assert_eq!(status(), 0x0b);
    device.lock().unwrap().write_bar(0, 0x14, &[0x0f]);
    assert_ne!(status() & STATUS_NEEDS_RESET, 0, "{:#x}", status());
}

/// A NIC using one of its backend's two pairs: the guest sees one pair, and its control
/// queue (device queue 2) is the backend's (queue 4), for starting and for stopping.
#[test]
fn a_nic_with_fewer_pairs_than_its_backend_uses_the_backends_control_queue() {
    const CTRL_VQ: u64 = 1 << 17;
    const MQ: u64 = 1 << 22;
    let mut behaviour = Behaviour::block(CTRL_VQ | MQ, 5);
    behaviour.config = vec![0u8; 24];
    behaviour.config[8..10].copy_from_slice(&2u16.to_le_bytes()); // max_virtqueue_pairs
    let mut rig = Rig::try_device(DeviceType::Net, behaviour, 3).unwrap();
    assert_eq!(rig.read16(DEVICE_OFFSET + 8), 1, "max_virtqueue_pairs");
    rig.negotiate(CTRL_VQ | MQ);
    rig.enable_queue(2);
    rig.write8(0x14, 0x0f);
    let started: Vec<u32> = rig
        .backend
        .messages(0)
        .iter()
        .filter(|m| m.request == FrontendReq::SET_VRING_KICK)
        .map(|m| m.u32_at(0) & 0xff)
        .collect();
    assert_eq!(started, vec![0, 4]);
    rig.write8(0x14, 0);
    let stopped: Vec<u32> = rig
        .backend
        .wait_for(0, FrontendReq::GET_VRING_BASE)
        .iter()
        .filter(|m| m.request == FrontendReq::GET_VRING_BASE)
        .map(|m| m.u32_at(0))
        .collect();
    assert_eq!(stopped, vec![0, 4]);
}

#[test]
fn ring_addresses_take_64_bit_accesses_as_well_as_halves() {
    let mut rig = Rig::new(Behaviour::block(0, 1));
    rig.negotiate(0);
    let addr: u64 = 0x1_0023_4000;
    rig.write(0x28, &addr.to_le_bytes());
    assert_eq!(rig.read(0x28, 8), addr.to_le_bytes());
    assert_eq!(rig.read(0x28, 4), 0x0023_4000u32.to_le_bytes());
    assert_eq!(rig.read(0x2c, 4), 1u32.to_le_bytes());
    rig.write32(0x2c, 0);
    assert_eq!(rig.read(0x28, 8), 0x23_4000u64.to_le_bytes());
    assert_eq!(rig.read(0x20, 8), DESC.to_le_bytes());
    assert_eq!(rig.read(0x30, 8), USED.to_le_bytes());
}

/// Whether KVM already has a wildcard ioeventfd at `addr`: it refuses a second one.
fn doorbell_taken(vm: &Vm, addr: u64) -> bool {
    let probe = crate::vm::new_eventfd().unwrap();
    let at = IoEventAddress::Mmio(addr);
    match vm.fd().register_ioevent(&probe, &at, NoDatamatch) {
        Ok(()) => {
            vm.fd()
                .unregister_ioevent(&probe, &at, NoDatamatch)
                .unwrap();
            false
        }
        Err(e) => {
            assert_eq!(e.errno(), libc::EEXIST, "{e}");
            true
        }
    }
}

#[test]
fn doorbells_follow_bar_0_when_the_guest_moves_it_or_turns_decoding_off() {
    let mut rig = Rig::new(Behaviour::block(0, 1));
    rig.start(0);
    let doorbell = |bar: u32| u64::from(bar) + NOTIFY_OFFSET;
    assert!(doorbell_taken(&rig.vm, doorbell(BAR)));
    const MOVED: u32 = 0xd000_0000;
    rig.device.write_config(0x10, &MOVED.to_le_bytes());
    assert!(!doorbell_taken(&rig.vm, doorbell(BAR)));
    assert!(doorbell_taken(&rig.vm, doorbell(MOVED)));
    rig.device.write_config(4, &[0, 0]); // memory space decoding off
    assert!(!doorbell_taken(&rig.vm, doorbell(MOVED)));
    rig.device.write_config(4, &[0x02, 0]);
    assert!(doorbell_taken(&rig.vm, doorbell(MOVED)));
    assert_eq!(rig.status(), 0x0f);
    rig.write8(0x14, 0);
    assert!(!doorbell_taken(&rig.vm, doorbell(MOVED)));
}
