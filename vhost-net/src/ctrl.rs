//! The control virtqueue: parsing a command out of an untrusted chain and deciding the ack.
//!
//! A command is `struct virtio_net_ctrl_hdr { u8 class; u8 cmd; }` and its data in
//! device-readable buffers, followed by a one-byte ack in a device-writable buffer (virtio 1.2,
//! 5.1.6.5). The daemon acts on VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (it steers the TAP's queues) and
//! accepts the receive-filter, MAC, VLAN and announce commands: a TAP delivers every frame
//! anyway, so there is nothing to filter.

use std::ops::Deref;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOBCAST,
    VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_DEL, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemory};

use crate::chain::{read_at, Segment};
use crate::error::{Error, Result};

/// Largest command payload read from the guest (a MAC table of 4096 entries fits).
pub const MAX_COMMAND_LEN: u64 = 32 * 1024;

/// Ack byte: the command was executed.
pub const ACK_OK: u8 = VIRTIO_NET_OK as u8;
/// Ack byte: the command failed or is not supported.
pub const ACK_ERR: u8 = VIRTIO_NET_ERR as u8;

/// A control command read from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Head descriptor index, for the used ring.
    pub head: u16,
    /// Command class (`VIRTIO_NET_CTRL_*`).
    pub class: u8,
    /// Command within the class.
    pub cmd: u8,
    /// The command-specific data after the two-byte header.
    pub data: Vec<u8>,
    /// Guest address of the ack byte.
    pub ack: GuestAddress,
}

/// What the device does in response to a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing beyond acknowledging it.
    None,
    /// Use the first `n` queue pairs.
    SetQueuePairs(u16),
}

/// Parses the command in `chain`. On error, returns the head index and, when the chain has a
/// usable ack byte, its address (to report VIRTIO_NET_ERR there).
#[allow(clippy::result_large_err)]
pub fn parse<D>(
    chain: DescriptorChain<D>,
) -> std::result::Result<Command, (u16, Option<GuestAddress>, Error)>
where
    D: Deref + Clone,
    D::Target: GuestMemory,
{
    let head = chain.head_index();
    let mem = chain.memory();
    // Readable part first, then the writable part, each checked on its own walk.
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut seen_writable = false;
    for (index, desc) in chain.clone().enumerate() {
        if desc.is_write_only() {
            seen_writable = true;
        } else if seen_writable {
            return Err((head, None, Error::WrongDirection { head, index }));
        }
    }
    let read_len = collect_dir(chain.clone(), false, &mut readable).map_err(|e| (head, None, e))?;
    collect_dir(chain.clone(), true, &mut writable).map_err(|e| (head, None, e))?;
    // The ack is the first byte the device writes; any command-specific result follows it
    // (virtio 1.x 5.1.6.5, as QEMU and Linux place it).
    let Some(first) = writable.first() else {
        return Err((
            head,
            None,
            Error::ChainTooShort {
                head,
                len: 0,
                hdr_len: 1,
            },
        ));
    };
    let ack = first.addr;
    if !(2..=MAX_COMMAND_LEN).contains(&read_len) {
        return Err((
            head,
            Some(ack),
            Error::ChainTooShort {
                head,
                len: read_len,
                hdr_len: 2,
            },
        ));
    }
    let mut bytes = vec![0u8; read_len as usize];
    if !read_at(mem, &readable, 0, &mut bytes) {
        return Err((head, Some(ack), Error::BrokenChain { head }));
    }
    Ok(Command {
        head,
        class: bytes[0],
        cmd: bytes[1],
        data: bytes.split_off(2),
        ack,
    })
}

/// Collects only the buffers of one direction (the control queue mixes both).
fn collect_dir<D>(chain: DescriptorChain<D>, writable: bool, out: &mut Vec<Segment>) -> Result<u64>
where
    D: Deref + Clone,
    D::Target: GuestMemory,
{
    // Like `chain::collect`, which rejects the other direction instead of skipping it.
    let head = chain.head_index();
    let mem = chain.memory();
    let mut total = 0u64;
    let mut count = 0usize;
    let mut last_has_next = false;
    for (index, desc) in chain.clone().enumerate() {
        count += 1;
        last_has_next = desc.has_next();
        if desc.is_write_only() != writable || desc.len() == 0 {
            continue;
        }
        let access = if writable {
            vm_memory::Permissions::Write
        } else {
            vm_memory::Permissions::Read
        };
        if !mem.check_range(desc.addr(), desc.len() as usize, access) {
            return Err(Error::OutOfGuestMemory {
                index,
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        total += u64::from(desc.len());
        out.push(Segment {
            addr: desc.addr(),
            len: desc.len(),
        });
    }
    if count == 0 || last_has_next {
        return Err(Error::BrokenChain { head });
    }
    Ok(total)
}

/// The ack for `cmd` and what the device must do, given `max_pairs` queue pairs and whether
/// VIRTIO_NET_F_MQ was negotiated.
pub fn handle(cmd: &Command, max_pairs: u16, mq: bool) -> (u8, Action) {
    let class = u32::from(cmd.class);
    let code = u32::from(cmd.cmd);
    match class {
        VIRTIO_NET_CTRL_MQ if code == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET => {
            let pairs = match cmd.data.as_slice() {
                [lo, hi] => u16::from_le_bytes([*lo, *hi]),
                _ => return (ACK_ERR, Action::None),
            };
            if mq && (1..=max_pairs).contains(&pairs) {
                (ACK_OK, Action::SetQueuePairs(pairs))
            } else {
                (ACK_ERR, Action::None)
            }
        }
        VIRTIO_NET_CTRL_RX if code <= VIRTIO_NET_CTRL_RX_NOBCAST && cmd.data.len() == 1 => {
            (ACK_OK, Action::None)
        }
        VIRTIO_NET_CTRL_MAC
            if code == VIRTIO_NET_CTRL_MAC_TABLE_SET || code == VIRTIO_NET_CTRL_MAC_ADDR_SET =>
        {
            (ACK_OK, Action::None)
        }
        VIRTIO_NET_CTRL_VLAN if code <= VIRTIO_NET_CTRL_VLAN_DEL && cmd.data.len() == 2 => {
            (ACK_OK, Action::None)
        }
        VIRTIO_NET_CTRL_ANNOUNCE if code == VIRTIO_NET_CTRL_ANNOUNCE_ACK => (ACK_OK, Action::None),
        _ => (ACK_ERR, Action::None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::{Bytes, GuestMemoryMmap};

    type Mem = GuestMemoryMmap<()>;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;

    fn memory() -> Mem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn parsed(
        mem: &Mem,
        descs: &[RawDescriptor],
    ) -> std::result::Result<Command, (u16, Option<GuestAddress>, Error)> {
        let q = MockSplitQueue::new(mem, 16);
        q.add_desc_chains(descs, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.iter(mem).unwrap().next().unwrap();
        parse(chain)
    }

    fn cmd(class: u32, code: u32, data: &[u8]) -> Command {
        Command {
            head: 0,
            class: class as u8,
            cmd: code as u8,
            data: data.to_vec(),
            ack: GuestAddress(0),
        }
    }

    #[test]
    fn mq_pairs_set_with_header_and_data_split() {
        let mem = memory();
        mem.write_slice(&[4, 0], GuestAddress(0x2000)).unwrap();
        mem.write_slice(&2u16.to_le_bytes(), GuestAddress(0x3000))
            .unwrap();
        let descs = [
            d(0x2000, 2, NEXT, 1),
            d(0x3000, 2, NEXT, 2),
            d(0x4000, 1, W, 0),
        ];
        let c = parsed(&mem, &descs).unwrap();
        assert_eq!((c.class, c.cmd, c.data.as_slice()), (4, 0, &[2u8, 0][..]));
        assert_eq!(c.ack, GuestAddress(0x4000));
        assert_eq!(handle(&c, 2, true), (ACK_OK, Action::SetQueuePairs(2)));
        assert_eq!(handle(&c, 1, true), (ACK_ERR, Action::None));
        assert_eq!(handle(&c, 2, false), (ACK_ERR, Action::None));
    }

    #[test]
    fn ack_is_the_first_writable_byte() {
        let mem = memory();
        mem.write_slice(&[0, 0, 1], GuestAddress(0x2000)).unwrap();
        let descs = [d(0x2000, 3, NEXT, 1), d(0x4000, 8, W, 0)];
        let c = parsed(&mem, &descs).unwrap();
        assert_eq!(c.ack, GuestAddress(0x4000));
        // A zero-length writable buffer first holds no ack.
        let descs = [
            d(0x2000, 3, NEXT, 1),
            d(0x3000, 0, W | NEXT, 2),
            d(0x4000, 8, W, 0),
        ];
        assert_eq!(parsed(&mem, &descs).unwrap().ack, GuestAddress(0x4000));
        assert_eq!(handle(&c, 1, true), (ACK_OK, Action::None), "PROMISC on");
    }

    #[test]
    fn hostile_chains() {
        let mem = memory();
        // No writable byte: nowhere to ack.
        let err = parsed(&mem, &[d(0x2000, 2, 0, 0)]).unwrap_err();
        assert_eq!(err.1, None);
        // Readable after writable.
        let err = parsed(&mem, &[d(0x4000, 1, W | NEXT, 1), d(0x2000, 2, 0, 0)]).unwrap_err();
        assert!(matches!(err.2, Error::WrongDirection { .. }), "{}", err.2);
        // A loop.
        let err = parsed(&mem, &[d(0x2000, 2, NEXT, 1), d(0x2100, 2, NEXT, 0)]).unwrap_err();
        assert!(matches!(err.2, Error::BrokenChain { .. }), "{}", err.2);
        // Header outside guest memory.
        let err = parsed(&mem, &[d(0x20_0000, 2, NEXT, 1), d(0x4000, 1, W, 0)]).unwrap_err();
        assert!(matches!(err.2, Error::OutOfGuestMemory { .. }), "{}", err.2);
        // One-byte header: acked with an error.
        let err = parsed(&mem, &[d(0x2000, 1, NEXT, 1), d(0x4000, 1, W, 0)]).unwrap_err();
        assert_eq!(err.1, Some(GuestAddress(0x4000)));
        // Huge payload.
        let err = parsed(&mem, &[d(0x1000, 0x4_0000, NEXT, 1), d(0x4000, 1, W, 0)]).unwrap_err();
        assert_eq!(err.1, Some(GuestAddress(0x4000)));
    }

    #[test]
    fn commands_accepted_and_refused() {
        use virtio_bindings::virtio_net::*;
        assert_eq!(
            handle(&cmd(VIRTIO_NET_CTRL_RX, 0, &[1]), 1, false).0,
            ACK_OK
        );
        assert_eq!(
            handle(&cmd(VIRTIO_NET_CTRL_RX, 5, &[0]), 1, false).0,
            ACK_OK
        );
        assert_eq!(
            handle(&cmd(VIRTIO_NET_CTRL_RX, 6, &[0]), 1, false).0,
            ACK_ERR
        );
        assert_eq!(
            handle(&cmd(VIRTIO_NET_CTRL_RX, 0, &[]), 1, false).0,
            ACK_ERR
        );
        assert_eq!(
            handle(
                &cmd(VIRTIO_NET_CTRL_MAC, 1, &[0x52, 0, 0, 0, 0, 1]),
                1,
                false
            )
            .0,
            ACK_OK
        );
        assert_eq!(
            handle(&cmd(VIRTIO_NET_CTRL_VLAN, 0, &[1, 0]), 1, false).0,
            ACK_OK
        );
        assert_eq!(
            handle(&cmd(VIRTIO_NET_CTRL_ANNOUNCE, 0, &[]), 1, false).0,
            ACK_OK
        );
        assert_eq!(
            handle(&cmd(VIRTIO_NET_CTRL_GUEST_OFFLOADS, 0, &[0; 8]), 1, false).0,
            ACK_ERR
        );
        assert_eq!(
            handle(&cmd(VIRTIO_NET_CTRL_MQ, 0, &[0, 0]), 4, true).0,
            ACK_ERR
        );
        assert_eq!(handle(&cmd(VIRTIO_NET_CTRL_MQ, 1, &[]), 4, true).0, ACK_ERR);
        assert_eq!(handle(&cmd(200, 0, &[]), 4, true).0, ACK_ERR);
    }
}
