package raftfsm

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"

	"github.com/hashicorp/go-memdb"
	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// Snapshot format: the magic, a length-prefixed SnapshotHeader, then records
// of (type varint, length varint, protobuf bytes), then a record of type 0.
const (
	snapshotMagic   = "KILNSNAP"
	snapshotVersion = 1
	maxRecordBytes  = 64 << 20
)

// recordTables lists what a snapshot holds, in restore order.
var recordTables = []struct {
	typ   pb.RecordType
	table string
	new   func() proto.Message
}{
	{pb.RecordType_RECORD_TYPE_NODE, tableNodes, func() proto.Message { return &pb.Node{} }},
	{pb.RecordType_RECORD_TYPE_PROJECT, tableProjects, func() proto.Message { return &pb.Project{} }},
	{pb.RecordType_RECORD_TYPE_JOBSET, tableJobsets, func() proto.Message { return &pb.Jobset{} }},
	{pb.RecordType_RECORD_TYPE_EVAL, tableEvals, func() proto.Message { return &pb.Eval{} }},
	{pb.RecordType_RECORD_TYPE_STEP, tableSteps, func() proto.Message { return &pb.Step{} }},
	{pb.RecordType_RECORD_TYPE_BUILD, tableBuilds, func() proto.Message { return &pb.Build{} }},
	{pb.RecordType_RECORD_TYPE_LEASE, tableLeases, func() proto.Message { return &pb.Lease{} }},
	{pb.RecordType_RECORD_TYPE_NAR_INFO, tableNarInfos, func() proto.Message { return &pb.NarInfo{} }},
	{pb.RecordType_RECORD_TYPE_LOG, tableLogs, func() proto.Message { return &pb.LogRecord{} }},
	{pb.RecordType_RECORD_TYPE_PIN, tablePins, func() proto.Message { return &pb.Pin{} }},
	{pb.RecordType_RECORD_TYPE_AGENT, tableAgents, func() proto.Message { return &pb.Agent{} }},
	{pb.RecordType_RECORD_TYPE_USER, tableUsers, func() proto.Message { return &pb.User{} }},
}

type snapshot struct {
	txn   *memdb.Txn
	index uint64
}

func (s *snapshot) Persist(sink raft.SnapshotSink) error {
	if err := writeSnapshot(sink, s.txn, s.index); err != nil {
		_ = sink.Cancel()
		return err
	}
	return sink.Close()
}

func (s *snapshot) Release() {}

func writeSnapshot(w io.Writer, txn *memdb.Txn, index uint64) error {
	bw := bufio.NewWriterSize(w, 1<<20)
	hdr, err := proto.Marshal(&pb.SnapshotHeader{Version: snapshotVersion, Index: index})
	if err != nil {
		return err
	}
	buf := append([]byte(snapshotMagic), protowire.AppendVarint(nil, uint64(len(hdr)))...)
	buf = append(buf, hdr...)
	if _, err := bw.Write(buf); err != nil {
		return fmt.Errorf("write snapshot header: %w", err)
	}
	if err := encodeRecords(bw, txn); err != nil {
		return err
	}
	if _, err := bw.Write(protowire.AppendVarint(nil, 0)); err != nil {
		return fmt.Errorf("write snapshot: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write snapshot: %w", err)
	}
	return nil
}

// snapshotChunk is a run of records of one table, encoded by a worker into
// out and written in the order the chunks were read.
type snapshotChunk struct {
	typ   pb.RecordType
	table string
	msgs  []proto.Message
	out   []byte
	err   error
	done  chan struct{}
}

const snapshotChunkLen = 1024

// encodeRecords writes every record of txn, encoding chunks of records on
// as many goroutines as there are CPUs (up to 4) while this one walks the
// tables and another writes the encoded chunks in order. The records are
// immutable in a read transaction, so workers may encode them concurrently.
func encodeRecords(w io.Writer, txn *memdb.Txn) error {
	workers := min(runtime.GOMAXPROCS(0), 4)
	jobs := make(chan *snapshotChunk, workers)
	order := make(chan *snapshotChunk, 2*workers)
	stop := make(chan struct{}) // closed when the writer gives up
	var wg sync.WaitGroup
	// Encoded chunks' buffers go back to free once written.
	free := make(chan []byte, 3*workers)
	for range workers {
		wg.Go(func() {
			// proto.Size fills each message's size cache, which the
			// marshal then uses, and the record is encoded straight into out.
			opts := proto.MarshalOptions{UseCachedSize: true}
			for c := range jobs {
				select {
				case c.out = <-free:
				default:
				}
				for _, m := range c.msgs {
					c.out = protowire.AppendVarint(c.out, uint64(c.typ))
					c.out = protowire.AppendVarint(c.out, uint64(proto.Size(m)))
					if c.out, c.err = opts.MarshalAppend(c.out, m); c.err != nil {
						break
					}
				}
				close(c.done)
			}
		})
	}
	writeErr := make(chan error, 1)
	go func() {
		var err error
		for c := range order {
			if err != nil {
				continue // drain, so the walk below never blocks
			}
			<-c.done
			switch {
			case c.err != nil:
				err = fmt.Errorf("encode %s record: %w", c.table, c.err)
			default:
				if _, werr := w.Write(c.out); werr != nil {
					err = fmt.Errorf("write snapshot: %w", werr)
				}
				select {
				case free <- c.out[:0]:
				default:
				}
			}
			if err != nil {
				close(stop)
			}
		}
		writeErr <- err
	}()
	send := func(c *snapshotChunk) bool {
		select {
		case order <- c:
		case <-stop:
			return false
		}
		jobs <- c
		return true
	}
	walkErr := func() error {
		for _, rt := range recordTables {
			c := &snapshotChunk{typ: rt.typ, table: rt.table, done: make(chan struct{})}
			sent := true
			add := func(m proto.Message) bool {
				c.msgs = append(c.msgs, m)
				if len(c.msgs) == snapshotChunkLen {
					if sent = send(c); !sent {
						return false
					}
					c = &snapshotChunk{typ: rt.typ, table: rt.table, done: make(chan struct{})}
				}
				return true
			}
			if err := eachRecord(txn, rt.table, add); err != nil {
				return err
			}
			if !sent || len(c.msgs) > 0 && !send(c) {
				return nil
			}
		}
		return nil
	}()
	close(jobs)
	close(order)
	wg.Wait()
	if err := <-writeErr; err != nil {
		return err
	}
	return walkErr
}

// eachRecord calls fn with every record of a table in id order until it
// returns false.
func eachRecord(txn *memdb.Txn, table string, fn func(proto.Message) bool) error {
	switch table {
	case tableSteps:
		readSteps(txn).each(func(s *stepRec) bool { return fn(s.step(false)) })
		return nil
	case tableBuilds:
		readBuilds(txn).byID.Scan(func(b *pb.Build) bool { return fn(b) })
		return nil
	}
	it, err := txn.Get(table, "id")
	if err != nil {
		return err
	}
	for o := it.Next(); o != nil && fn(o.(proto.Message)); o = it.Next() {
	}
	return nil
}

// readSnapshot builds a fresh state from a snapshot stream.
func readSnapshot(r io.Reader) (*memdb.MemDB, *pb.SnapshotHeader, error) {
	br := bufio.NewReaderSize(r, 1<<20)
	magic := make([]byte, len(snapshotMagic))
	if _, err := io.ReadFull(br, magic); err != nil || string(magic) != snapshotMagic {
		return nil, nil, fmt.Errorf("%w: not a kiln snapshot", ErrInvalid)
	}
	var hdr pb.SnapshotHeader
	raw, err := readRecord(br)
	if err != nil {
		return nil, nil, fmt.Errorf("snapshot header: %w", err)
	}
	if err := proto.Unmarshal(raw, &hdr); err != nil {
		return nil, nil, fmt.Errorf("%w: snapshot header: %v", ErrInvalid, err)
	}
	if hdr.Version != snapshotVersion {
		return nil, nil, fmt.Errorf("%w: snapshot version %d, this build reads %d", ErrInvalid, hdr.Version, snapshotVersion)
	}
	db, err := newState()
	if err != nil {
		return nil, nil, err
	}
	// Decoding runs in its own goroutine, ahead of the inserts.
	batches := make(chan []restoreRecord, 8)
	decodeErr := make(chan error, 1)
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		defer close(batches)
		decodeErr <- decodeRecords(br, batches, stop)
	}()
	txn := db.Txn(true)
	defer txn.Abort()
	steps, err := writeSteps(txn)
	if err != nil {
		return nil, nil, err
	}
	builds, err := writeBuilds(txn)
	if err != nil {
		return nil, nil, err
	}
	var strs interner
	paths := map[string]string{} // each step's path, for sharing below
	for batch := range batches {
		for _, rec := range batch {
			switch m := rec.msg.(type) {
			case *pb.Step:
				paths[m.DrvPath] = m.DrvPath
				steps.put(txn, m, &strs)
			case *pb.Build:
				builds.put(m)
			default:
				if err := txn.Insert(rec.table, rec.msg); err != nil {
					return nil, nil, fmt.Errorf("restore %s: %w", rec.table, err)
				}
			}
		}
	}
	if err := <-decodeErr; err != nil {
		return nil, nil, err
	}
	// Inputs and dependents name other steps: one copy of each path, as
	// applying the commands left it (not yet published: the records may
	// still change).
	canon := func(p string) string {
		if c, ok := paths[p]; ok {
			return c
		}
		return p
	}
	steps.each(func(s *stepRec) bool {
		for i, in := range s.InputDrvs {
			s.InputDrvs[i] = canon(in)
		}
		for i, d := range s.Dependents {
			s.Dependents[i] = canon(d)
		}
		return true
	})
	txn.Commit()
	return db, &hdr, nil
}

type restoreRecord struct {
	table string
	msg   proto.Message
}

// decodeRecords reads records until the end marker, sending them in batches.
func decodeRecords(br *bufio.Reader, out chan<- []restoreRecord, stop <-chan struct{}) error {
	tables := map[pb.RecordType]int{}
	for i, rt := range recordTables {
		tables[rt.typ] = i
	}
	batch := make([]restoreRecord, 0, 1024)
	send := func() bool {
		select {
		case out <- batch:
			batch = make([]restoreRecord, 0, 1024)
			return true
		case <-stop:
			return false
		}
	}
	for {
		typ, err := binaryVarint(br)
		if err != nil {
			return fmt.Errorf("snapshot record type: %w", err)
		}
		if typ == 0 {
			if len(batch) > 0 && !send() {
				return fmt.Errorf("restore abandoned")
			}
			return nil
		}
		raw, err := readRecord(br)
		if err != nil {
			return fmt.Errorf("snapshot record: %w", err)
		}
		i, ok := tables[pb.RecordType(typ)]
		if !ok {
			continue // a record type from a newer version: skipped
		}
		msg := recordTables[i].new()
		if err := proto.Unmarshal(raw, msg); err != nil {
			return fmt.Errorf("%w: snapshot %s record: %v", ErrInvalid, recordTables[i].table, err)
		}
		batch = append(batch, restoreRecord{recordTables[i].table, msg})
		if len(batch) == cap(batch) && !send() {
			return fmt.Errorf("restore abandoned")
		}
	}
}

func binaryVarint(br *bufio.Reader) (uint64, error) {
	var v uint64
	for shift := uint(0); shift < 64; shift += 7 {
		b, err := br.ReadByte()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return 0, err
		}
		v |= uint64(b&0x7f) << shift
		if b < 0x80 {
			return v, nil
		}
	}
	return 0, fmt.Errorf("%w: varint overflow", ErrInvalid)
}

func readRecord(br *bufio.Reader) ([]byte, error) {
	n, err := binaryVarint(br)
	if err != nil {
		return nil, err
	}
	if n > maxRecordBytes {
		return nil, fmt.Errorf("%w: record of %d bytes", ErrTooLarge, n)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(br, b); err != nil {
		return nil, err
	}
	return b, nil
}
