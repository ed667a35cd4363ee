package raftfsm

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/raft"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

const nixBase32Alphabet = "0123456789abcdfghijklmnpqrsvwxyz"

// storePath makes a valid, deterministic store path for a name.
func storePath(name string) string {
	h := sha256.Sum256([]byte(name))
	b := make([]byte, 32)
	for i := range b {
		b[i] = nixBase32Alphabet[int(h[i])%32]
	}
	return "/nix/store/" + string(b) + "-" + name
}

// testBlob is a deterministic blob name for a string.
func testBlob(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

// testNarInfo is a valid record for path; its hashes are made up.
func testNarInfo(path string, refs ...string) *pb.NarInfo {
	fd := sha256.Sum256([]byte("file " + path))
	nd := sha256.Sum256([]byte("nar " + path))
	return &pb.NarInfo{
		StorePath: path, Compression: "zstd", Url: NarURL(fd[:]),
		FileHash: "sha256:" + nixbase32.EncodeToString(fd[:]), FileSize: 100,
		NarHash: "sha256:" + nixbase32.EncodeToString(nd[:]), NarSize: 300,
		References: refs, Blob: hex.EncodeToString(fd[:]),
	}
}

func drv(name string) string { return storePath(name + ".drv") }

func node(name string, inputs ...string) *pb.DerivationNode {
	n := &pb.DerivationNode{DrvPath: drv(name), System: "x86_64-linux", Outputs: []*pb.Output{{Name: "out", Path: storePath(name)}}}
	for _, in := range inputs {
		n.InputDrvs = append(n.InputDrvs, drv(in))
	}
	return n
}

func cmd(t testing.TB, typ pb.CommandType, m proto.Message, now int64) *pb.Command {
	t.Helper()
	c, err := NewCommand(typ, m, now)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// applier feeds entries to an FSM with increasing indexes.
type applier struct {
	t     testing.TB
	f     *FSM
	index uint64
	now   int64
}

func newApplier(t testing.TB) *applier { return &applier{t: t, f: New(nil), now: 1000} }

// apply commits one entry of commands and returns their results.
func (a *applier) apply(cmds ...*pb.Command) []CommandResult {
	a.t.Helper()
	data, err := EncodeEntry(cmds)
	if err != nil {
		a.t.Fatal(err)
	}
	a.index++
	return a.f.Apply(&raft.Log{Type: raft.LogCommand, Index: a.index, Data: data}).(*EntryResult).Results
}

// one applies a single command and returns its result.
func (a *applier) one(typ pb.CommandType, m proto.Message) CommandResult {
	a.t.Helper()
	a.now++
	return a.apply(cmd(a.t, typ, m, a.now))[0]
}

func (a *applier) dump() *Dump {
	a.t.Helper()
	d, err := a.f.Read().Dump()
	if err != nil {
		a.t.Fatal(err)
	}
	return d
}

type memSink struct {
	bytes.Buffer
	cancelled bool
}

func (s *memSink) ID() string    { return "mem" }
func (s *memSink) Cancel() error { s.cancelled = true; return nil }
func (s *memSink) Close() error  { return nil }

func snapshotBytes(t testing.TB, f *FSM) []byte {
	t.Helper()
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var sink memSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatal(err)
	}
	snap.Release()
	return sink.Bytes()
}

func restoreFrom(t testing.TB, b []byte) *FSM {
	t.Helper()
	f := New(nil)
	if err := f.Restore(io.NopCloser(bytes.NewReader(b))); err != nil {
		t.Fatal(err)
	}
	return f
}

func diffDumps(a, b *Dump) string { return cmp.Diff(a, b, protocmp.Transform()) }
