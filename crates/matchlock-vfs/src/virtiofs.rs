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
use crate::op::Payload;
use std::io;
use std::ops::Deref;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixListener;
use std::sync::{mpsc, Arc, Mutex};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::{
    Address, Bytes, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryLoadGuard,
    GuestMemoryMmap, Permissions, VolatileSlice,
};
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

/// Threads answering the requests that wait on the host's disk (`fsync`, `syncfs`), so one of
/// those (a database committing a large file) does not hold up every other file operation of
/// the sandbox. Everything else is answered on the queue's own thread: handing each request to
/// another thread costs two thread wake-ups, which measured 10-20 % of throughput and small-file
/// rates (`docs/benchmarks.md`), while answering it takes microseconds.
const WORKERS: usize = 4;

/// Opcodes answered by the workers: `FUSE_FSYNC`, `FUSE_FSYNCDIR`, `FUSE_SYNCFS`.
const SLOW_OPCODES: [u32; 3] = [20, 30, 50];

/// One request waiting for a worker, with the queue its answer goes back on.
struct Job {
    chain: Chain,
    vring: VringRwLock,
    event_idx: bool,
}

/// The device's side of one virtio-fs connection.
struct Backend {
    fuse: Arc<FuseFs>,
    mem: Mutex<Option<Memory>>,
    event_idx: Mutex<bool>,
    exit: (EventConsumer, EventNotifier),
    jobs: Mutex<mpsc::Sender<Job>>,
    /// The queue thread's reply buffer, reused across requests.
    reply: Mutex<Vec<u8>>,
}

impl Backend {
    fn new(fuse: Arc<FuseFs>) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..WORKERS {
            let (rx, fuse) = (rx.clone(), fuse.clone());
            std::thread::Builder::new()
                .name(format!("vfs-worker-{i}"))
                .spawn(move || worker(&fuse, &rx))?;
        }
        Ok(Backend {
            fuse,
            mem: Mutex::new(None),
            event_idx: Mutex::new(false),
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
            jobs: Mutex::new(tx),
            reply: Mutex::new(Vec::new()),
        })
    }

    /// Answers every request waiting on `vring`, handing the slow ones to the workers.
    fn process_queue(&self, index: usize, vring: &VringRwLock) -> io::Result<()> {
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
                if index == HIPRIO_QUEUE || !SLOW_OPCODES.contains(&opcode(&chain)) {
                    let mut reply = self.reply.lock().unwrap_or_else(|p| p.into_inner());
                    let head = chain.head_index();
                    let written = answer(&self.fuse, &chain, &mut reply);
                    complete(vring, head, written, event_idx)?;
                } else {
                    let job = Job {
                        chain,
                        vring: vring.clone(),
                        event_idx,
                    };
                    let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
                    jobs.send(job)
                        .map_err(|_| io::Error::other("workers gone"))?;
                }
            }
            // With EVENT_IDX the queue's avail index is read once per iteration: look again
            // until no request arrived while notifications were off.
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }
}

/// The high-priority queue's index (forgets and interrupts).
const HIPRIO_QUEUE: usize = 0;

/// The opcode of a request, from its first buffer (0 when that cannot hold one).
fn opcode<M>(chain: &DescriptorChain<M>) -> u32
where
    M: Deref<Target = GuestMemoryMmap> + Clone,
{
    // A peek at the first buffer only: it only picks the thread, and `answer` reads the
    // header properly (a kernel never splits it).
    match chain.clone().next() {
        Some(d) if !d.is_write_only() && d.len() >= 8 => d
            .addr()
            .checked_add(4)
            .and_then(|at| chain.memory().read_obj::<u32>(at).ok())
            .map_or(0, u32::from_le),
        _ => 0,
    }
}

/// A worker: answers requests until the device is gone.
fn worker(fuse: &FuseFs, jobs: &Mutex<mpsc::Receiver<Job>>) {
    let mut reply = Vec::new();
    loop {
        let job = match jobs.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let head = job.chain.head_index();
        let written = answer(fuse, &job.chain, &mut reply);
        if let Err(e) = complete(&job.vring, head, written, job.event_idx) {
            tracing::debug!("virtio-fs: cannot complete a request: {e}");
        }
    }
}

/// Returns a request's buffers to the guest, interrupting it when it asked to be.
fn complete(vring: &VringRwLock, head: u16, written: u32, event_idx: bool) -> io::Result<()> {
    vring.add_used(head, written).map_err(io::Error::other)?;
    let notify = !event_idx || vring.needs_notification().map_err(io::Error::other)?;
    if notify {
        vring.signal_used_queue()?;
    }
    Ok(())
}

/// Answers one request; returns the bytes written into the guest's reply buffers. A chain the
/// guest built wrong (outside its memory, no room for a header) is returned with nothing
/// written. `reply` is scratch space.
fn answer<M>(fuse: &FuseFs, chain: &DescriptorChain<M>, reply: &mut Vec<u8>) -> u32
where
    M: Deref<Target = GuestMemoryMmap> + Clone,
{
    let Some(bufs) = Buffers::new(chain.memory(), chain) else {
        return 0;
    };
    let mut head = [0u8; IN_HEADER];
    if bufs.input_len < IN_HEADER || bufs.copy_in(0, &mut head) != IN_HEADER {
        return 0;
    }
    let Some(h) = InHeader::parse(&head) else {
        return 0;
    };
    reply.clear();
    // A write's data stays in guest memory: the host kernel copies it into the file.
    let args = if h.opcode == WRITE {
        bufs.input_len.min(IN_HEADER + WRITE_IN)
    } else {
        bufs.input_len
    };
    let len = if args > MAX_REQUEST {
        // Too large to have come from a well-behaved kernel: answer without reading it.
        error_reply(reply, h.unique, libc::E2BIG);
        reply.len()
    } else {
        let mut req = vec![0u8; args];
        bufs.copy_in(0, &mut req);
        let mut payload = GuestPayload {
            bufs: &bufs,
            pending: bufs.input_len - args,
            data_at: args,
        };
        match fuse.handle(&req, &mut payload, reply) {
            Some(len) => len,
            None => return 0,
        }
    };
    if len > bufs.output_len {
        // The kernel sized its buffer for the largest valid answer; if ours is larger, say so
        // rather than write a truncated one.
        reply.clear();
        error_reply(reply, h.unique, libc::EIO);
        if bufs.output_len < OUT_HEADER {
            return 0;
        }
        bufs.copy_out(0, reply);
        return OUT_HEADER as u32;
    }
    // A read's data is already in place after the header.
    bufs.copy_out(0, reply);
    len as u32
}

/// `FUSE_WRITE`'s opcode and the size of its `fuse_write_in`.
const WRITE: u32 = 16;
const WRITE_IN: usize = 40;

/// The guest memory of one request: the buffers the guest filled (the request) and those it
/// left for the reply, in order.
struct Buffers<'a> {
    input: Vec<VolatileSlice<'a>>,
    input_len: usize,
    output: Vec<VolatileSlice<'a>>,
    output_len: usize,
}

impl<'a> Buffers<'a> {
    /// `None` if a descriptor points outside guest memory or the lengths overflow.
    fn new<M>(mem: &'a GuestMemoryMmap, chain: &DescriptorChain<M>) -> Option<Self>
    where
        M: Deref<Target = GuestMemoryMmap> + Clone,
    {
        let mut b = Buffers {
            input: Vec::new(),
            input_len: 0,
            output: Vec::new(),
            output_len: 0,
        };
        for d in chain.clone() {
            let (list, total, access) = if d.is_write_only() {
                (&mut b.output, &mut b.output_len, Permissions::Write)
            } else {
                (&mut b.input, &mut b.input_len, Permissions::Read)
            };
            *total = total.checked_add(d.len() as usize)?;
            for slice in mem.get_slices(d.addr(), d.len() as usize, access).ok()? {
                list.push(slice.ok()?);
            }
        }
        Some(b)
    }

    /// Copies request bytes from `at` into `buf`; returns how many there were.
    fn copy_in(&self, at: usize, buf: &mut [u8]) -> usize {
        let mut done = 0;
        for s in spans(&self.input, at, buf.len()) {
            done += s.copy_to(&mut buf[done..]);
        }
        done
    }

    /// Copies `data` into the reply buffers at `at`.
    fn copy_out(&self, at: usize, data: &[u8]) {
        let mut done = 0;
        for s in spans(&self.output, at, data.len()) {
            s.copy_from(&data[done..done + s.len()]);
            done += s.len();
        }
    }
}

/// The parts of `slices` that cover `len` bytes from `at`.
fn spans<'a>(
    slices: &[VolatileSlice<'a>],
    mut at: usize,
    mut len: usize,
) -> Vec<VolatileSlice<'a>> {
    let mut out = Vec::new();
    for s in slices {
        if len == 0 {
            break;
        }
        if at >= s.len() {
            at -= s.len();
            continue;
        }
        let n = (s.len() - at).min(len);
        if let Ok(sub) = s.subslice(at, n) {
            out.push(sub);
        }
        at = 0;
        len -= n;
    }
    out
}

/// `iovec`s over guest memory, for `preadv`/`pwritev`.
fn iovecs(spans: &[VolatileSlice<'_>]) -> Vec<libc::iovec> {
    spans
        .iter()
        .map(|s| libc::iovec {
            iov_base: s.ptr_guard_mut().as_ptr().cast(),
            iov_len: s.len(),
        })
        .collect()
}

/// Drops the first `n` bytes from `iov`.
fn advance(iov: &mut Vec<libc::iovec>, mut n: usize) {
    while n > 0 && !iov.is_empty() {
        if n >= iov[0].iov_len {
            n -= iov[0].iov_len;
            iov.remove(0);
        } else {
            // SAFETY: stays within the buffer the iovec describes.
            iov[0].iov_base = unsafe { iov[0].iov_base.cast::<u8>().add(n) }.cast();
            iov[0].iov_len -= n;
            n = 0;
        }
    }
}

/// A request's data and reply data left in guest memory ([`Payload`]).
struct GuestPayload<'b, 'a> {
    bufs: &'b Buffers<'a>,
    /// Request bytes after the arguments (a write's data).
    pending: usize,
    /// Where they start.
    data_at: usize,
}

impl Payload for GuestPayload<'_, '_> {
    fn pending(&self) -> usize {
        self.pending
    }

    fn write_to(&mut self, fd: BorrowedFd<'_>, offset: u64) -> io::Result<usize> {
        let iov = iovecs(&spans(&self.bufs.input, self.data_at, self.pending));
        // SAFETY: every iovec describes mapped guest memory held by the chain's guard; pwritev
        // only reads from it.
        transfer(iov, offset, |iov, n, at| unsafe {
            libc::pwritev(fd.as_raw_fd(), iov, n, at)
        })
    }

    fn read_from(&mut self, fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<usize> {
        let room = self.bufs.output_len.saturating_sub(OUT_HEADER);
        let iov = iovecs(&spans(&self.bufs.output, OUT_HEADER, len.min(room)));
        // SAFETY: every iovec describes mapped, guest-writable memory held by the chain's guard.
        transfer(iov, offset, |iov, n, at| unsafe {
            libc::preadv(fd.as_raw_fd(), iov, n, at)
        })
    }
}

/// Runs `io` (`preadv` or `pwritev` at an offset) over `iov` until all of it is done or the
/// file ends; returns the bytes moved.
fn transfer(
    mut iov: Vec<libc::iovec>,
    offset: u64,
    io: impl Fn(*const libc::iovec, i32, i64) -> isize,
) -> io::Result<usize> {
    let mut done = 0;
    while !iov.is_empty() {
        let at = i64::try_from(offset + done as u64)
            .map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let r = io(iov.as_ptr(), iov.len().min(1024) as i32, at);
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            break;
        }
        done += r as usize;
        advance(&mut iov, r as usize);
    }
    Ok(done)
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
        let index = device_event as usize;
        let vring = vrings
            .get(index)
            .ok_or_else(|| io::Error::other("event for an unknown queue"))?;
        self.process_queue(index, vring)
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

#[cfg(test)]
mod tests {
    //! Requests laid out in guest memory the way the guest's driver does it, split across
    //! descriptors, answered by [`answer`].

    use super::*;
    use crate::ops::NODE_ID_LIMIT;
    use crate::MountFs;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const R0: u64 = NODE_ID_LIMIT + 1;

    fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
        let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn request(opcode: u32, nodeid: u64, args: &[u8], extra: usize) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(&((IN_HEADER + args.len() + extra) as u32).to_le_bytes());
        r.extend_from_slice(&opcode.to_le_bytes());
        r.extend_from_slice(&9u64.to_le_bytes());
        r.extend_from_slice(&nodeid.to_le_bytes());
        r.extend_from_slice(&[0; 16]);
        r.extend_from_slice(args);
        r
    }

    /// Puts `parts` (request bytes, or `None` for a reply buffer of that size) at successive
    /// addresses, runs the chain, and returns the bytes written and the reply buffers' bytes.
    fn run(
        mem: &GuestMemoryMmap,
        fuse: &FuseFs,
        parts: &[(Option<Vec<u8>>, u32)],
    ) -> (u32, Vec<u8>) {
        let q = MockSplitQueue::new(mem, 16);
        let mut at = 0x10000u64;
        let mut descs = Vec::new();
        let mut outs = Vec::new();
        for (bytes, len) in parts {
            match bytes {
                Some(b) => {
                    mem.write_slice(b, GuestAddress(at)).unwrap();
                    descs.push(desc(at, *len, false));
                }
                None => {
                    descs.push(desc(at, *len, true));
                    outs.push((at, *len));
                }
            }
            at += 0x10000;
        }
        let chain = q.build_desc_chain(&descs).unwrap();
        let written = answer(fuse, &chain, &mut Vec::new());
        let mut reply = Vec::new();
        for (addr, len) in outs {
            let mut b = vec![0u8; len as usize];
            mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            reply.extend_from_slice(&b);
        }
        (written, reply)
    }

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn le64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn requests_and_data_cross_descriptors_and_go_straight_to_the_file() {
        let d = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(d.path().join("f"), &data).unwrap();
        let fuse = FuseFs::new(vec![Arc::new(MountFs::open(d.path(), false).unwrap())]);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 22)]).unwrap();

        let mut init = vec![7, 0, 0, 0, 37, 0, 0, 0];
        init.resize(64, 0);
        let r = request(26, 0, &init, 0);
        let (n, reply) = run(
            &mem,
            &fuse,
            &[(Some(r.clone()), r.len() as u32), (None, 80)],
        );
        assert_eq!((n, le32(&reply, 0), le32(&reply, 4)), (80, 80, 0));

        // A lookup whose name starts in one descriptor and ends in the next.
        let r = request(1, R0, b"f\0", 0);
        let (a, b) = r.split_at(41);
        let (n, reply) = run(
            &mem,
            &fuse,
            &[
                (Some(a.to_vec()), a.len() as u32),
                (Some(b.to_vec()), b.len() as u32),
                (None, 16 + 128),
            ],
        );
        assert_eq!((n, le32(&reply, 4)), (144, 0));
        let node = le64(&reply, 16);

        let open = [2u32.to_le_bytes(), 0u32.to_le_bytes()].concat(); // O_RDWR
        let (_, reply) = run(
            &mem,
            &fuse,
            &[(Some(request(14, node, &open, 0)), 48), (None, 32)],
        );
        let fh = le64(&reply, 16);

        // A read lands in two reply buffers after the header.
        let mut read = Vec::new();
        read.extend_from_slice(&fh.to_le_bytes());
        read.extend_from_slice(&100u64.to_le_bytes());
        read.extend_from_slice(&6000u32.to_le_bytes());
        read.resize(40, 0);
        let (n, reply) = run(
            &mem,
            &fuse,
            &[
                (Some(request(15, node, &read, 0)), 80),
                (None, 16),
                (None, 2500),
                (None, 3500),
            ],
        );
        assert_eq!((n, le32(&reply, 0), le32(&reply, 4)), (6016, 6016, 0));
        assert_eq!(&reply[16..], &data[100..6100]);

        // A write's data is taken from two descriptors after the arguments.
        let mut write = Vec::new();
        write.extend_from_slice(&fh.to_le_bytes());
        write.extend_from_slice(&50u64.to_le_bytes());
        write.extend_from_slice(&3000u32.to_le_bytes());
        write.resize(40, 0);
        let r = request(16, node, &write, 3000);
        let (n, reply) = run(
            &mem,
            &fuse,
            &[
                (Some(r), 80),
                (Some(vec![0xaa; 1000]), 1000),
                (Some(vec![0xbb; 2000]), 2000),
                (None, 24),
            ],
        );
        assert_eq!((n, le32(&reply, 4), le32(&reply, 16)), (24, 0, 3000));
        let on_disk = std::fs::read(d.path().join("f")).unwrap();
        assert_eq!(&on_disk[..50], &data[..50]);
        assert!(on_disk[50..1050].iter().all(|&b| b == 0xaa));
        assert!(on_disk[1050..3050].iter().all(|&b| b == 0xbb));
        assert_eq!(&on_disk[3050..], &data[3050..]);

        // Broken chains: a buffer outside guest memory, a header cut short, a reply buffer too
        // small for the answer (an error header instead), none at all.
        let r = request(1, R0, b"f\0", 0);
        let q = MockSplitQueue::new(&mem, 16);
        let outside = q
            .build_desc_chain(&[desc(1 << 30, 60, false), desc(0x20000, 144, true)])
            .unwrap();
        assert_eq!(answer(&fuse, &outside, &mut Vec::new()), 0);
        let (n, _) = run(&mem, &fuse, &[(Some(r[..20].to_vec()), 20), (None, 144)]);
        assert_eq!(n, 0);
        let (n, reply) = run(
            &mem,
            &fuse,
            &[(Some(r.clone()), r.len() as u32), (None, 16)],
        );
        assert_eq!((n, le32(&reply, 4) as i32), (16, -libc::EIO));
        let (n, _) = run(&mem, &fuse, &[(Some(r.clone()), r.len() as u32)]);
        assert_eq!(n, 0);
    }

    #[test]
    fn the_thread_is_picked_from_the_first_buffer() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 22)]).unwrap();
        let q = MockSplitQueue::new(&mem, 16);
        let fsync = request(20, R0, &[0; 16], 0);
        mem.write_slice(&fsync, GuestAddress(0x10000)).unwrap();
        let chain = |descs: &[RawDescriptor]| q.build_desc_chain(descs).unwrap();
        let whole = chain(&[desc(0x10000, 56, false), desc(0x20000, 16, true)]);
        assert_eq!(opcode(&whole), 20);
        assert!(SLOW_OPCODES.contains(&opcode(&whole)));
        // Too short to hold an opcode, or a reply buffer first: 0, answered on the queue.
        assert_eq!(opcode(&chain(&[desc(0x10000, 6, false)])), 0);
        assert_eq!(opcode(&chain(&[desc(0x20000, 16, true)])), 0);
        assert_eq!(opcode(&chain(&[desc(u64::MAX - 2, 8, false)])), 0);
    }
}
