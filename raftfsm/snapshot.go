package raftfsm

import (
	"bufio"
	"errors"
	"fmt"
	"io"

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
	opts := proto.MarshalOptions{Deterministic: true}
	for _, rt := range recordTables {
		it, err := txn.Get(rt.table, "id")
		if err != nil {
			return err
		}
		for o := it.Next(); o != nil; o = it.Next() {
			buf = buf[:0]
			buf = protowire.AppendVarint(buf, uint64(rt.typ))
			size := opts.Size(o.(proto.Message))
			buf = protowire.AppendVarint(buf, uint64(size))
			buf, err = opts.MarshalAppend(buf, o.(proto.Message))
			if err != nil {
				return fmt.Errorf("encode %s record: %w", rt.table, err)
			}
			if _, err := bw.Write(buf); err != nil {
				return fmt.Errorf("write snapshot: %w", err)
			}
		}
	}
	if _, err := bw.Write(protowire.AppendVarint(nil, 0)); err != nil {
		return fmt.Errorf("write snapshot: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write snapshot: %w", err)
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
	db, err := memdb.NewMemDB(schema())
	if err != nil {
		return nil, nil, err
	}
	tables := map[pb.RecordType]int{}
	for i, rt := range recordTables {
		tables[rt.typ] = i
	}
	txn := db.Txn(true)
	defer txn.Abort()
	for {
		typ, err := binaryVarint(br)
		if err != nil {
			return nil, nil, fmt.Errorf("snapshot record type: %w", err)
		}
		if typ == 0 {
			break
		}
		raw, err := readRecord(br)
		if err != nil {
			return nil, nil, fmt.Errorf("snapshot record: %w", err)
		}
		i, ok := tables[pb.RecordType(typ)]
		if !ok {
			continue // a record type from a newer version: skipped
		}
		msg := recordTables[i].new()
		if err := proto.Unmarshal(raw, msg); err != nil {
			return nil, nil, fmt.Errorf("%w: snapshot %s record: %v", ErrInvalid, recordTables[i].table, err)
		}
		if err := txn.Insert(recordTables[i].table, msg); err != nil {
			return nil, nil, fmt.Errorf("restore %s: %w", recordTables[i].table, err)
		}
	}
	txn.Commit()
	return db, &hdr, nil
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
