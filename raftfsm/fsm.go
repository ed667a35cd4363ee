package raftfsm

import (
	"fmt"
	"io"
	"log/slog"
	"runtime/debug"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/go-memdb"
	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// MaxCommandsPerEntry bounds how many commands one Raft entry may carry; it
// also makes lease IDs (index*MaxCommandsPerEntry + position) unique.
const MaxCommandsPerEntry = 1 << 12

// LeaseID is the fencing token of the lease granted by the command at
// position pos of the Raft entry at index.
func LeaseID(index uint64, pos int) uint64 { return index*MaxCommandsPerEntry + uint64(pos) }

// CommandResult is the outcome of one command.
type CommandResult struct {
	// ID is what the command created or touched (a build ID, a lease ID).
	ID  uint64
	Err error
}

// EntryResult is what Apply returns for a Raft entry: one result per command.
type EntryResult struct {
	Index   uint64
	Results []CommandResult
}

// FSM is the replicated state machine. It implements raft.BatchingFSM.
type FSM struct {
	log *slog.Logger

	mu      sync.RWMutex // guards db and abandon, swapped by Restore
	db      *memdb.MemDB
	abandon chan struct{}

	applied atomic.Uint64

	totals totals // build list totals, per version of what was counted

	strs interner // used by the apply goroutine only
}

var _ raft.BatchingFSM = (*FSM)(nil)

// New returns an empty state machine.
func New(log *slog.Logger) *FSM {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	db, err := newState()
	if err != nil {
		panic(fmt.Sprintf("raftfsm: invalid schema: %v", err)) // a programming error
	}
	return &FSM{log: log, db: db, abandon: make(chan struct{})}
}

// AppliedIndex is the index of the last entry applied (or restored).
func (f *FSM) AppliedIndex() uint64 { return f.applied.Load() }

// Apply applies one Raft entry.
func (f *FSM) Apply(l *raft.Log) any {
	return f.ApplyBatch([]*raft.Log{l})[0]
}

// ApplyBatch applies entries in order; its results are what Apply would
// have returned for each.
func (f *FSM) ApplyBatch(logs []*raft.Log) []any {
	f.mu.RLock()
	db := f.db
	f.mu.RUnlock()
	out := make([]any, len(logs))
	for i, l := range logs {
		if l.Type == raft.LogCommand {
			out[i] = f.applyEntry(db, l.Index, l.Data)
		}
		f.applied.Store(l.Index)
	}
	return out
}

// applyEntry decodes and applies one entry. Undecodable bytes, or a command
// this version does not know and may not skip, panic: applying the rest
// would make this replica diverge.
//
// Fast path: all commands share one memdb transaction (path copies in the
// radix trees are shared, which is most of the cost). If any command fails,
// that transaction is dropped and the entry is applied again with one
// transaction per command, so a failed command leaves no trace and the
// others see exactly what they would have seen.
func (f *FSM) applyEntry(db *memdb.MemDB, index uint64, data []byte) *EntryResult {
	var e pb.Entry
	if err := proto.Unmarshal(data, &e); err != nil {
		panic(fmt.Sprintf("raftfsm: undecodable entry at index %d: %v", index, err))
	}
	res := &EntryResult{Index: index, Results: make([]CommandResult, len(e.Commands))}
	txn := db.Txn(true)
	failed := false
	for pos, c := range e.Commands {
		h, msg, err := f.decode(c, index)
		if err != nil {
			res.Results[pos].Err = err
			continue
		}
		id, err := h.apply(&applyCtx{txn: txn, now: c.Now, index: index, pos: pos, log: f.log, strs: &f.strs}, msg)
		if err != nil {
			failed = true
			break
		}
		res.Results[pos].ID = id
	}
	if !failed {
		txn.Commit()
		return res
	}
	txn.Abort()
	for pos, c := range e.Commands {
		h, msg, err := f.decode(c, index)
		if err != nil {
			res.Results[pos] = CommandResult{Err: err}
			continue
		}
		txn := db.Txn(true)
		id, err := h.apply(&applyCtx{txn: txn, now: c.Now, index: index, pos: pos, log: f.log, strs: &f.strs}, msg)
		if err != nil {
			txn.Abort()
		} else {
			txn.Commit()
		}
		res.Results[pos] = CommandResult{ID: id, Err: err}
	}
	return res
}

// decode finds a command's handler and decodes its payload. An unknown
// ignorable command yields an ErrUnknownCommand result; anything else that
// cannot be decoded panics.
func (f *FSM) decode(c *pb.Command, index uint64) (handler, proto.Message, error) {
	h, ok := handlers[c.Type]
	if !ok {
		if c.Ignorable {
			f.log.Warn("skipping unknown ignorable command", "type", int32(c.Type), "index", index)
			return handler{}, nil, fmt.Errorf("%w: %d", ErrUnknownCommand, c.Type)
		}
		panic(fmt.Sprintf("raftfsm: unknown command type %d at index %d", c.Type, index))
	}
	msg := h.new()
	if err := proto.Unmarshal(c.Payload, msg); err != nil {
		panic(fmt.Sprintf("raftfsm: undecodable %s at index %d: %v", c.Type, index, err))
	}
	return h, msg, nil
}

// applyCtx is what a command handler sees.
type applyCtx struct {
	txn   *memdb.Txn
	strs  *interner
	now   int64
	index uint64
	pos   int
	log   *slog.Logger
}

type handler struct {
	new   func() proto.Message
	apply func(*applyCtx, proto.Message) (uint64, error)
}

// handlers is filled by each command family's file.
var handlers = map[pb.CommandType]handler{}

func register[T proto.Message](t pb.CommandType, newFn func() T, fn func(*applyCtx, T) (uint64, error)) {
	handlers[t] = handler{
		new:   func() proto.Message { return newFn() },
		apply: func(c *applyCtx, m proto.Message) (uint64, error) { return fn(c, m.(T)) },
	}
}

func init() {
	register(pb.CommandType_COMMAND_TYPE_NOOP, func() *pb.Noop { return &pb.Noop{} },
		func(*applyCtx, *pb.Noop) (uint64, error) { return 0, nil })
}

// NewCommand wraps a payload in the envelope. The leader stamps now.
func NewCommand(t pb.CommandType, payload proto.Message, now int64) (*pb.Command, error) {
	b, err := proto.Marshal(payload)
	if err != nil {
		return nil, fmt.Errorf("encode %s: %w", t, err)
	}
	return &pb.Command{Type: t, Payload: b, Now: now}, nil
}

// EncodeEntry encodes commands as one Raft entry.
func EncodeEntry(cmds []*pb.Command) ([]byte, error) {
	if len(cmds) > MaxCommandsPerEntry {
		return nil, fmt.Errorf("%w: %d commands in one entry (max %d)", ErrInvalid, len(cmds), MaxCommandsPerEntry)
	}
	return proto.Marshal(&pb.Entry{Commands: cmds})
}

// Read returns a consistent read-only view of the current state.
func (f *FSM) Read() *Reader {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return &Reader{txn: f.db.Txn(false), abandon: f.abandon, totals: &f.totals}
}

// swap replaces the whole state (Restore) and wakes every watcher of the old one.
func (f *FSM) swap(db *memdb.MemDB, index uint64) {
	f.mu.Lock()
	old := f.abandon
	f.db = db
	f.abandon = make(chan struct{})
	f.applied.Store(index)
	f.mu.Unlock()
	close(old)
}

// Snapshot captures the state for raft; Persist streams it later.
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return &snapshot{txn: f.db.Txn(false), index: f.applied.Load()}, nil
}

// restoreGCPercent is GOGC while a snapshot is restored.
const restoreGCPercent = 40

// restoreGC counts restores in progress (GOGC is the process's: the first
// to start sets it, the last to end puts back what was there before).
var restoreGC struct {
	sync.Mutex
	n, old int
}

func tightenGC() (done func()) {
	restoreGC.Lock()
	defer restoreGC.Unlock()
	if restoreGC.n == 0 {
		restoreGC.old = debug.SetGCPercent(restoreGCPercent)
		if restoreGC.old >= 0 && restoreGC.old < restoreGCPercent {
			debug.SetGCPercent(restoreGC.old)
		}
	}
	restoreGC.n++
	return func() {
		restoreGC.Lock()
		defer restoreGC.Unlock()
		if restoreGC.n--; restoreGC.n == 0 {
			debug.SetGCPercent(restoreGC.old)
		}
	}
}

// Restore replaces the state with a snapshot's.
func (f *FSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	// A restore builds the whole state at once, and the collector lets
	// the heap grow to twice what it last found live: a node restoring a
	// million steps peaked near twice their size. Collecting more often
	// while it runs keeps the peak lower (BenchmarkState1M's restored-node
	// figures in docs/design.md). A stricter setting of the operator's is
	// kept.
	done := tightenGC()
	db, hdr, err := readSnapshot(rc)
	done()
	if err != nil {
		return err
	}
	f.swap(db, hdr.Index)
	return nil
}
