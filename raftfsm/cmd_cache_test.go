package raftfsm

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

func base(p string) string { return strings.TrimPrefix(p, StoreDir+"/") }

func (a *applier) narInfoPaths() []string {
	a.t.Helper()
	var out []string
	for _, n := range a.dump().NarInfos {
		out = append(out, n.StorePath)
	}
	slices.Sort(out)
	return out
}

func TestPutNarInfoRefusesBadRecords(t *testing.T) {
	good := func() *pb.NarInfo { return testNarInfo(storePath("good")) }
	tests := []struct {
		name   string
		mutate func(*pb.NarInfo)
	}{
		{"bad store path", func(n *pb.NarInfo) { n.StorePath = "/tmp/x" }},
		{"xz compression", func(n *pb.NarInfo) { n.Compression = "xz" }},
		{"url not matching file hash", func(n *pb.NarInfo) { n.Url = NarURL(make([]byte, 32)) }},
		{"traversal url", func(n *pb.NarInfo) { n.Url = "../../etc/passwd" }},
		{"bad file hash", func(n *pb.NarInfo) { n.FileHash = "sha256:zzz" }},
		{"md5 nar hash", func(n *pb.NarInfo) { n.NarHash = "md5:abc" }},
		{"blob not matching", func(n *pb.NarInfo) { n.Blob = strings.Repeat("0", 64) }},
		{"zero size", func(n *pb.NarInfo) { n.NarSize = 0 }},
		{"bad reference", func(n *pb.NarInfo) { n.References = []string{"../x"} }},
		{"unsorted references", func(n *pb.NarInfo) { n.References = []string{base(storePath("b")), base(storePath("a"))} }},
		{"deriver not a drv", func(n *pb.NarInfo) { n.Deriver = base(storePath("a")) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newApplier(t)
			before := a.dump()
			n := good()
			tt.mutate(n)
			r := a.one(pb.CommandType_COMMAND_TYPE_PUT_NAR_INFO, &pb.PutNarInfo{NarInfo: n})
			if !errors.Is(r.Err, ErrInvalid) {
				t.Fatalf("err = %v, want ErrInvalid", r.Err)
			}
			if d := diffDumps(before, a.dump()); d != "" {
				t.Errorf("state changed (-before +after):\n%s", d)
			}
		})
	}
}

func TestPutNarInfoKeepsFirstRecord(t *testing.T) {
	a := newApplier(t)
	p := storePath("x")
	first := testNarInfo(p)
	if r := a.one(pb.CommandType_COMMAND_TYPE_PUT_NAR_INFO, &pb.PutNarInfo{NarInfo: first}); r.Err != nil {
		t.Fatal(r.Err)
	}
	second := testNarInfo(p)
	second.NarSize = 999
	if r := a.one(pb.CommandType_COMMAND_TYPE_PUT_NAR_INFO, &pb.PutNarInfo{NarInfo: second}); r.Err != nil {
		t.Fatal(r.Err)
	}
	got, err := a.f.Read().NarInfo(HashPart(p))
	if err != nil {
		t.Fatal(err)
	}
	if got.NarSize != 300 || got.CreatedAt != 1001 {
		t.Errorf("record = size %d created %d, want the first (300, 1001)", got.NarSize, got.CreatedAt)
	}
	// Same hash, other name: a conflict.
	other := testNarInfo(StoreDir + "/" + HashPart(p) + "-other")
	if r := a.one(pb.CommandType_COMMAND_TYPE_PUT_NAR_INFO, &pb.PutNarInfo{NarInfo: other}); !errors.Is(r.Err, ErrConflict) {
		t.Errorf("err = %v, want ErrConflict", r.Err)
	}
}

// TestCollectGarbage: what each kind of root keeps, and what goes.
func TestCollectGarbage(t *testing.T) {
	a := newApplier(t)
	put := func(name string, refs ...string) string {
		t.Helper()
		p := storePath(name)
		var bases []string
		for _, r := range refs {
			bases = append(bases, base(storePath(r)))
		}
		slices.Sort(bases)
		if r := a.one(pb.CommandType_COMMAND_TYPE_PUT_NAR_INFO, &pb.PutNarInfo{NarInfo: testNarInfo(p, bases...)}); r.Err != nil {
			t.Fatal(r.Err)
		}
		return p
	}
	gc := func(grace int64) uint64 {
		t.Helper()
		r := a.one(pb.CommandType_COMMAND_TYPE_COLLECT_GARBAGE, &pb.CollectGarbage{GraceSeconds: grace, MaxDeletes: 100})
		if r.Err != nil {
			t.Fatal(r.Err)
		}
		return r.ID
	}
	libc := put("libc")
	lib := put("lib", "libc")
	app := put("app", "lib")
	put("orphan")
	queued := put("queued-dep")
	put("young", "orphan")
	// A queued build whose input's output is queued-dep.
	sub := submit(1, "top", node("top", "queued-dep"), node("queued-dep"))
	if r := a.one(pb.CommandType_COMMAND_TYPE_SUBMIT_BUILD, sub); r.Err != nil {
		t.Fatal(r.Err)
	}
	if r := a.one(pb.CommandType_COMMAND_TYPE_PIN_PATH, &pb.PinPath{Pin: &pb.Pin{StorePath: app}}); r.Err != nil {
		t.Fatal(r.Err)
	}
	// Records were created at 1001..1006; at now=1009 a 4 s grace keeps
	// "young" (1006), and through its reference "orphan".
	if n := gc(4); n != 0 {
		t.Fatalf("gc deleted %d records, want 0: %v", n, a.narInfoPaths())
	}
	if n := gc(0); n != 2 {
		t.Fatalf("gc deleted %d records, want 2 (orphan, young)", n)
	}
	want := []string{app, lib, libc, queued}
	slices.Sort(want)
	if d := cmp.Diff(want, a.narInfoPaths()); d != "" {
		t.Errorf("kept (-want +got):\n%s", d)
	}
	// Cancel the build and unpin: everything goes, two at a time.
	if r := a.one(pb.CommandType_COMMAND_TYPE_CANCEL_BUILD, &pb.CancelBuild{Id: 1}); r.Err != nil {
		t.Fatal(r.Err)
	}
	if r := a.one(pb.CommandType_COMMAND_TYPE_UNPIN_PATH, &pb.UnpinPath{StorePath: app}); r.Err != nil {
		t.Fatal(r.Err)
	}
	a.now++
	r := a.apply(cmd(t, pb.CommandType_COMMAND_TYPE_COLLECT_GARBAGE, &pb.CollectGarbage{MaxDeletes: 2}, a.now))[0]
	if r.Err != nil || r.ID != 2 {
		t.Fatalf("bounded gc = %d, %v; want 2 deletions", r.ID, r.Err)
	}
	if n := gc(0); n != 2 {
		t.Fatalf("second gc deleted %d, want 2", n)
	}
	if got := a.narInfoPaths(); len(got) != 0 {
		t.Errorf("left %v", got)
	}
	if r := a.one(pb.CommandType_COMMAND_TYPE_UNPIN_PATH, &pb.UnpinPath{StorePath: app}); !errors.Is(r.Err, ErrNotFound) {
		t.Errorf("unpin twice: %v, want ErrNotFound", r.Err)
	}
}
