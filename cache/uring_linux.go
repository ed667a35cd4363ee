package cache

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// uring is a small io_uring (Linux 5.4 and later) through which a blob's
// blocks are written without a goroutine waiting in a write system call:
// a goroutine blocked in write keeps its P (its share of GOMAXPROCS) until
// the runtime's sysmon takes it back, which on a busy two-core machine
// left work runnable and the cores idle (docs/design.md, "Measured").
// Writes are queued (one io_uring_enter, which does not wait), their
// completions read from the shared ring; a writer that must wait for one
// waits on an eventfd through Go's network poller, holding no P.
//
// One uring belongs to one blobWriter and is used from one goroutine.
type uring struct {
	fd      int
	ringMem []byte
	sqeMem  []byte
	sqTail  *uint32
	sqMask  uint32
	sqArray []uint32
	sqes    []uringSQE
	cqHead  *uint32
	cqTail  *uint32
	cqMask  uint32
	cqes    []uringCQE
	event   *os.File // the eventfd the kernel signals each completion on
	pending int      // submitted, not yet reaped
	iovs    []unix.Iovec
}

// The kernel's structures (include/uapi/linux/io_uring.h).
type uringSQOffsets struct {
	Head, Tail, RingMask, RingEntries, Flags, Dropped, Array, Resv1 uint32
	UserAddr                                                        uint64
}

type uringCQOffsets struct {
	Head, Tail, RingMask, RingEntries, Overflow, CQEs, Flags, Resv1 uint32
	UserAddr                                                        uint64
}

type uringParams struct {
	SQEntries, CQEntries, Flags, SQThreadCPU, SQThreadIdle, Features, WQFd uint32
	Resv                                                                   [3]uint32
	SQOff                                                                  uringSQOffsets
	CQOff                                                                  uringCQOffsets
}

type uringSQE struct {
	Opcode, Flags uint8
	IOPrio        uint16
	Fd            int32
	Off, Addr     uint64
	Len, RWFlags  uint32
	UserData      uint64
	BufIndex      uint16
	Personality   uint16
	SpliceFdIn    int32
	Addr3, Pad2   uint64
}

type uringCQE struct {
	UserData uint64
	Res      int32
	Flags    uint32
}

const (
	uringOpWritev        = 2          // IORING_OP_WRITEV (Linux 5.1)
	uringFeatSingleMmap  = 1          // IORING_FEAT_SINGLE_MMAP (Linux 5.4)
	uringOffSQEs         = 0x10000000 // IORING_OFF_SQES
	uringRegisterEventfd = 4          // IORING_REGISTER_EVENTFD
	uringSQESize         = 64
	uringCQESize         = 16
	uringParamsSize      = 120
)

// The layouts must be the kernel's.
var _ = [1]struct{}{}[unsafe.Sizeof(uringSQE{})-uringSQESize]
var _ = [1]struct{}{}[unsafe.Sizeof(uringCQE{})-uringCQESize]
var _ = [1]struct{}{}[unsafe.Sizeof(uringParams{})-uringParamsSize]

// uringOff is set once io_uring_setup has been refused (no io_uring in
// this kernel, or a sandbox forbids it): writers then write directly
// without trying again.
var uringOff atomic.Bool

// errNoURing: this process does not use io_uring.
var errNoURing = errors.New("io_uring is not available")

// newURing sets up a ring with room for entries writes in flight, tagged
// 0 to entries-1.
func newURing(entries uint32) (r *uring, err error) {
	if uringOff.Load() {
		return nil, errNoURing
	}
	var p uringParams
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		if errno == unix.ENOSYS || errno == unix.EPERM || errno == unix.EACCES {
			uringOff.Store(true)
		}
		return nil, fmt.Errorf("io_uring_setup: %w", errno)
	}
	r = &uring{fd: int(fd), iovs: make([]unix.Iovec, entries)}
	defer func() {
		if err != nil {
			r.close()
		}
	}()
	if p.Features&uringFeatSingleMmap == 0 {
		uringOff.Store(true)
		return nil, fmt.Errorf("%w: the kernel's io_uring predates one mapping for both rings", errNoURing)
	}
	size := max(p.SQOff.Array+p.SQEntries*4, p.CQOff.CQEs+p.CQEntries*uringCQESize)
	if r.ringMem, err = unix.Mmap(r.fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return nil, fmt.Errorf("mapping the io_uring: %w", err)
	}
	if r.sqeMem, err = unix.Mmap(r.fd, uringOffSQEs, int(p.SQEntries)*uringSQESize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return nil, fmt.Errorf("mapping the io_uring: %w", err)
	}
	at := func(off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&r.ringMem[off])) }
	r.sqTail, r.sqMask = at(p.SQOff.Tail), *at(p.SQOff.RingMask)
	r.sqArray = unsafe.Slice(at(p.SQOff.Array), p.SQEntries)
	r.sqes = unsafe.Slice((*uringSQE)(unsafe.Pointer(&r.sqeMem[0])), p.SQEntries)
	r.cqHead, r.cqTail, r.cqMask = at(p.CQOff.Head), at(p.CQOff.Tail), *at(p.CQOff.RingMask)
	r.cqes = unsafe.Slice((*uringCQE)(unsafe.Pointer(&r.ringMem[p.CQOff.CQEs])), p.CQEntries)
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	// A non-blocking descriptor: os.NewFile puts it on the network poller.
	r.event = os.NewFile(uintptr(efd), "io_uring eventfd")
	if _, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), uringRegisterEventfd, uintptr(unsafe.Pointer(&efd)), 1, 0, 0); errno != 0 {
		return nil, fmt.Errorf("io_uring_register eventfd: %w", errno)
	}
	return r, nil
}

// write queues a write of b (which must stay untouched until its
// completion is reaped) at off in fd, to be reaped as tag, which is not
// pending already.
func (r *uring) write(fd int, b []byte, off int64, tag int) error {
	iov := &r.iovs[tag]
	iov.Base = &b[0]
	iov.SetLen(len(b))
	tail := *r.sqTail // only this goroutine writes the tail
	i := tail & r.sqMask
	r.sqes[i] = uringSQE{Opcode: uringOpWritev, Fd: int32(fd), Off: uint64(off), Addr: uint64(uintptr(unsafe.Pointer(iov))), Len: 1, UserData: uint64(tag)}
	r.sqArray[i] = i
	atomic.StoreUint32(r.sqTail, tail+1) // publishes the entry to the kernel
	for {
		n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), 1, 0, 0, 0, 0)
		if errno == unix.EINTR || errno == unix.EAGAIN {
			continue
		}
		if errno != 0 {
			return fmt.Errorf("io_uring_enter: %w", errno)
		}
		if n != 1 {
			return fmt.Errorf("io_uring_enter took %d writes, not 1", n)
		}
		r.pending++
		return nil
	}
}

// reap hands every completion there is to done (its tag and result: bytes
// written, or minus an errno). With wait, and no completion yet, it first
// waits for one (on the poller).
func (r *uring) reap(wait bool, done func(tag int, res int32)) error {
	var b [8]byte
	for {
		got := false
		for head := atomic.LoadUint32(r.cqHead); head != atomic.LoadUint32(r.cqTail); head++ {
			c := r.cqes[head&r.cqMask]
			atomic.StoreUint32(r.cqHead, head+1)
			r.pending--
			got = true
			done(int(c.UserData), c.Res)
		}
		if got || !wait || r.pending == 0 {
			return nil
		}
		// The kernel adds 1 to the eventfd after posting a completion:
		// one that was missed above is seen after this read.
		if _, err := r.event.Read(b[:]); err != nil {
			return fmt.Errorf("waiting for the io_uring: %w", err)
		}
	}
}

// close waits for the writes still pending (the kernel may still read
// their memory) and frees the ring.
func (r *uring) close() {
	for r.pending > 0 && r.reap(true, func(int, int32) {}) == nil {
	}
	if r.event != nil {
		r.event.Close()
	}
	if r.sqeMem != nil {
		unix.Munmap(r.sqeMem)
	}
	if r.ringMem != nil {
		unix.Munmap(r.ringMem)
	}
	unix.Close(r.fd)
}
