//! A vhost-user virtio-fs device: QEMU's `vhost-user-fs-device` hands its virtqueues and the
//! guest's (shared, memfd-backed) RAM to this process over a Unix socket, and the guest kernel's
//! own FUSE client puts each request on a queue. No agent in the guest touches the data: a write
//! crosses guest memory once, as the kernel pins or copies it into the request, and the host
//! reads it straight from there.
//!
//! The vhost-user handshake, the memory table and the vrings are the rust-vmm crates'
//! (`vhost-user-backend`, `virtio-queue`, `vm-memory`); each request is answered by [`FuseFs`].
//! Queue 0 is virtio-fs's high-priority queue (forgets), queue 1 its request queue.

use crate::fuse::{FuseFs, InHeader, IN_HEADER, MAX_REQUEST, OUT_HEADER};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{DescriptorChain, QueueOwnedT, Reader, Writer};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// The high-priority queue and one request queue (what QEMU's `num-request-queues=1` gives).
const NUM_QUEUES: usize = 2;
/// Descriptors per queue. The guest's FUSE client sizes its largest request by it (pages per
/// request = queue size - 4, at most 256): 1024 lets a request carry a whole 1 MiB.
pub const QUEUE_SIZE: usize = 1024;

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;
type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap>>;

/// The device's side of one virtio-fs connection.
struct Backend {
    fuse: Arc<FuseFs>,
    mem: Mutex<Option<Memory>>,
    event_idx: Mutex<bool>,
    exit: (EventConsumer, EventNotifier),
    /// The reply being built, reused across requests.
    reply: Mutex<Vec<u8>>,
}

impl Backend {
    fn new(fuse: Arc<FuseFs>) -> io::Result<Self> {
        Ok(Backend {
            fuse,
            mem: Mutex::new(None),
            event_idx: Mutex::new(false),
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
            reply: Mutex::new(Vec::new()),
        })
    }

    /// Answers every request waiting on `vring`, then tells the guest.
    fn process_queue(&self, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = self.mem.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Ok(());
        };
        let event_idx = *self.event_idx.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            let chains: Vec<Chain> = vring
                .get_mut()
                .get_queue_mut()
                .iter(mem.memory())
                .map_err(io::Error::other)?
                .collect();
            for chain in chains {
                let head = chain.head_index();
                let written = self.process_chain(chain);
                vring.add_used(head, written).map_err(io::Error::other)?;
            }
            let notify = if event_idx {
                vring.needs_notification().map_err(io::Error::other)?
            } else {
                true
            };
            if notify {
                vring.signal_used_queue()?;
            }
            // With EVENT_IDX the queue's avail index is read once per iteration: look again
            // until no request arrived while notifications were off.
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }

    /// Answers one request; returns the bytes written into the guest's reply buffers. A chain
    /// the guest built wrong (outside its memory, too long) is returned with nothing written.
    fn process_chain(&self, chain: Chain) -> u32 {
        let mem = chain.memory();
        let (Ok(mut reader), Ok(mut writer)) = (
            Reader::new(mem, chain.clone()),
            Writer::new(mem, chain.clone()),
        ) else {
            return 0;
        };
        let n = reader.available_bytes();
        let mut reply = self.reply.lock().unwrap_or_else(|p| p.into_inner());
        reply.clear();
        if n > MAX_REQUEST {
            // Too large to have come from a well-behaved kernel: answer without reading it.
            let mut head = [0u8; IN_HEADER];
            if reader.read_exact(&mut head).is_err() {
                return 0;
            }
            match InHeader::parse(&head) {
                Some(h) => error_reply(&mut reply, h.unique, libc::E2BIG),
                None => return 0,
            }
        } else {
            let mut req = vec![0u8; n];
            if reader.read_exact(&mut req).is_err() || !self.fuse.handle(&req, &mut reply) {
                return 0;
            }
        }
        if reply.len() > writer.available_bytes() {
            // The kernel sized its buffer for the largest valid answer; if ours is larger, say
            // so rather than write a truncated one.
            let unique = u64::from_le_bytes(reply[8..16].try_into().unwrap_or_default());
            reply.clear();
            error_reply(&mut reply, unique, libc::EIO);
        }
        if writer.write_all(&reply).is_err() {
            return 0;
        }
        writer.bytes_written() as u32
    }
}

/// A bare `fuse_out_header` carrying `-errno`.
fn error_reply(out: &mut Vec<u8>, unique: u64, errno: i32) {
    out.extend_from_slice(&(OUT_HEADER as u32).to_le_bytes());
    out.extend_from_slice(&(-errno).to_le_bytes());
    out.extend_from_slice(&unique.to_le_bytes());
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, enabled: bool) {
        *self.event_idx.lock().unwrap_or_else(|p| p.into_inner()) = enabled;
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.mem.lock().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other("unexpected event on a virtio-fs queue"));
        }
        let vring = vrings
            .get(device_event as usize)
            .ok_or_else(|| io::Error::other("event for an unknown queue"))?;
        self.process_queue(vring)
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }
}

/// Serves one virtio-fs device on `listener` until QEMU disconnects (the VM stopped). Blocks:
/// run it on a thread of its own. `name` names the threads.
pub fn serve(name: &str, listener: UnixListener, fuse: Arc<FuseFs>) -> io::Result<()> {
    let backend = Arc::new(Backend::new(fuse)?);
    let mut daemon = VhostUserDaemon::new(
        name.to_string(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| io::Error::other(e.to_string()))?;
    let mut listener = Listener::from(listener);
    daemon
        .start(&mut listener)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let result = daemon.wait().map_err(|e| io::Error::other(e.to_string()));
    // Stop the vring worker threads too (the daemon only stops its own on `serve`).
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
    result
}
