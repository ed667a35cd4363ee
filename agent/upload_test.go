package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"connectrpc.com/connect"
	"github.com/google/go-cmp/cmp"
	"github.com/klauspost/compress/zstd"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"google.golang.org/protobuf/testing/protocmp"

	"github.com/kilnci/kiln/rpc"
	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
	"github.com/kilnci/kiln/rpc/gen/kiln/v1/kilnv1connect"
)

// received is one UploadNar call as a coordinator saw it.
type received struct {
	header  *kilnv1.NarHeader
	body    []byte
	chunks  []int // each chunk's size
	trailer *kilnv1.NarTrailer
}

// fakeCoordinators answer UploadNar over real sockets: the first call
// (counted across all of them) fails as a lost leader would, after
// reading everything; later ones succeed.
type fakeCoordinators struct {
	kilnv1connect.UnimplementedAgentServiceHandler
	calls atomic.Int32
	mu    sync.Mutex
	got   []received
}

func (f *fakeCoordinators) UploadNar(_ context.Context, stream *connect.ClientStream[kilnv1.UploadNarRequest]) (*connect.Response[kilnv1.UploadNarResponse], error) {
	n := f.calls.Add(1)
	var r received
	for stream.Receive() {
		switch p := stream.Msg().Part.(type) {
		case *kilnv1.UploadNarRequest_Header:
			r.header = p.Header
		case *kilnv1.UploadNarRequest_ZstdChunk:
			r.body = append(r.body, p.ZstdChunk...)
			r.chunks = append(r.chunks, len(p.ZstdChunk))
		case *kilnv1.UploadNarRequest_Trailer:
			r.trailer = p.Trailer
		}
	}
	f.mu.Lock()
	f.got = append(f.got, r)
	f.mu.Unlock()
	if err := stream.Err(); err != nil {
		return nil, err
	}
	if n == 1 {
		return nil, connect.NewError(connect.CodeUnavailable, errors.New("not the leader"))
	}
	return connect.NewResponse(&kilnv1.UploadNarResponse{}), nil
}

func newUploadAgent(t *testing.T) (*Agent, *fakeCoordinators) {
	t.Helper()
	f := &fakeCoordinators{}
	var urls []string
	for range 2 {
		_, h := kilnv1connect.NewAgentServiceHandler(f)
		srv := httptest.NewServer(h)
		t.Cleanup(srv.Close)
		urls = append(urls, srv.URL)
	}
	a, err := New(Config{Coordinators: urls, WorkDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	a.cred = "agent-1.secret"
	return a, f
}

// infoOf is what a store would register for nar.
func infoOf(nar []byte, refs ...string) storePathInfo {
	h := sha256.Sum256(nar)
	return storePathInfo{NarHash: "sha256:" + nixbase32.EncodeToString(h[:]), NarSize: uint64(len(nar)), References: refs}
}

func TestSendOutputDumpsAgainForTheNextCoordinator(t *testing.T) {
	a, f := newUploadAgent(t)
	// Incompressible, so the upload takes several 1 MiB chunks.
	nar := make([]byte, 3<<20+12345)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range nar {
		nar[i] = byte(rng.Uint32())
	}
	lease := &kilnv1.Lease{LeaseId: 7, DrvPath: "/nix/store/00000000000000000000000000000000-x.drv"}
	path := "/nix/store/00000000000000000000000000000000-x"
	dumps := 0
	err := a.sendOutput(context.Background(), lease, path, infoOf(nar, "dep"), func(w io.Writer) error {
		dumps++
		_, err := w.Write(nar)
		return err
	})
	if err != nil {
		t.Fatalf("sendOutput: %v", err)
	}
	if len(f.got) != 2 || dumps != 2 {
		t.Fatalf("%d uploads of %d dumps, want 2 of 2 (one that failed, then the output dumped again)", len(f.got), dumps)
	}
	// Both are streamed: no hashes in the header, the store's in the
	// trailer; the agent computes no FileHash (the coordinator hashes what
	// arrives).
	wantHeader := &kilnv1.NarHeader{LeaseId: 7, StorePath: path, References: []string{"dep"}, Deriver: "00000000000000000000000000000000-x.drv"}
	info := infoOf(nar)
	for i, got := range f.got {
		if diff := cmp.Diff(wantHeader, got.header, protocmp.Transform()); diff != "" {
			t.Errorf("upload %d: header (-want +got):\n%s", i, diff)
		}
		wantTrailer := &kilnv1.NarTrailer{NarHash: info.NarHash, NarSize: info.NarSize, FileSize: uint64(len(got.body))}
		if diff := cmp.Diff(wantTrailer, got.trailer, protocmp.Transform()); diff != "" {
			t.Errorf("upload %d: trailer (-want +got):\n%s", i, diff)
		}
	}
	first, second := f.got[0], f.got[1]
	if len(second.body) <= 2<<20 {
		t.Errorf("the upload is %d bytes: the test wants several chunks", len(second.body))
	}
	// A coordinator refuses a chunk over rpc.MaxNarChunk.
	for i, got := range f.got {
		if big := slices.IndexFunc(got.chunks, func(n int) bool { return n > rpc.MaxNarChunk || n == 0 }); big >= 0 {
			t.Errorf("upload %d: chunk %d is %d bytes: chunks are 1 to %d bytes (all: %v)", i, big, got.chunks[big], rpc.MaxNarChunk, got.chunks)
		}
	}
	if !bytes.Equal(first.body, second.body) {
		t.Errorf("the first upload's bytes (%d) differ from the second's (%d)", len(first.body), len(second.body))
	}
	dec, err := zstd.NewReader(bytes.NewReader(second.body))
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	if got, err := io.ReadAll(dec); err != nil || !bytes.Equal(got, nar) {
		t.Errorf("the upload does not decompress to the NAR (%v)", err)
	}
}

// TestSendOutputStopsWhenPackingFails: a dump that fails, or that is not
// what the store registered, abandons the upload (no trailer) and tries no
// other coordinator; an output over the lease's limit is not sent at all.
func TestSendOutputStopsWhenPackingFails(t *testing.T) {
	broken := errors.New("the output vanished")
	start := []byte("the start of a NAR")
	for _, tc := range []struct {
		name  string
		info  storePathInfo
		limit uint64
		dump  func(io.Writer) error
		want  error // errors.Is; nil: any error
		calls int32
	}{
		{"dump fails", infoOf(start), 0, func(w io.Writer) error {
			_, _ = w.Write(start)
			return broken
		}, broken, 1},
		{"shorter than registered", infoOf(append(start, 'x')), 0, func(w io.Writer) error {
			_, err := w.Write(start)
			return err
		}, ErrDump, 1},
		{"over the lease's limit", infoOf(start), uint64(len(start)) - 1, func(w io.Writer) error {
			t.Error("an output over the limit was dumped")
			return nil
		}, nil, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, f := newUploadAgent(t)
			lease := &kilnv1.Lease{LeaseId: 8, DrvPath: "/nix/store/00000000000000000000000000000000-y.drv", MaxNarBytes: tc.limit}
			err := a.sendOutput(context.Background(), lease, "/nix/store/00000000000000000000000000000000-y", tc.info, tc.dump)
			if err == nil || tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("sendOutput = %v, want %v", err, tc.want)
			}
			f.mu.Lock()
			defer f.mu.Unlock()
			for _, r := range f.got {
				if r.trailer != nil {
					t.Fatalf("an abandoned upload was completed with a trailer: %v", r.trailer)
				}
			}
			if n := f.calls.Load(); n > tc.calls {
				t.Fatalf("%d upload calls, want at most %d (no other coordinator is tried)", n, tc.calls)
			}
		})
	}
}

func TestParseDumpDB(t *testing.T) {
	const path = "/nix/store/bab5zwnh078rb90wb145xqfdx60bq85c-y"
	// What Nix 2.8 printed for a path with one reference.
	real := path + "\na6dac826f0dda7132432044a045d01c1f32be245c63250b65c1dfb93680d1a19\n160\n/nix/store/yrvi9nsmq3ng2il6zcsrjk28rkxa1lxw-y.drv\n1\n/nix/store/zr2knphxg8yyy2mkq8akf2hfknjvdiz7-x\n"
	for _, tc := range []struct {
		name string
		out  string
		want storePathInfo
		ok   bool
	}{
		// nix-store -q --hash printed this NarHash for the same path.
		{"one reference", real, storePathInfo{NarHash: "sha256:068s1ml97yqxbjv50cn68pi2pwy105fh8jh468j179yxy0kcinm6", NarSize: 160,
			References: []string{"zr2knphxg8yyy2mkq8akf2hfknjvdiz7-x"}}, true},
		{"no references, no deriver", path + "\na6dac826f0dda7132432044a045d01c1f32be245c63250b65c1dfb93680d1a19\n160\n\n0\n",
			storePathInfo{NarHash: "sha256:068s1ml97yqxbjv50cn68pi2pwy105fh8jh468j179yxy0kcinm6", NarSize: 160}, true},
		{"another path", strings.Replace(real, "-y\n", "-z\n", 1), storePathInfo{}, false},
		{"short hash", strings.Replace(real, "a6dac8", "", 1), storePathInfo{}, false},
		{"base32 hash", strings.Replace(real, "a6dac826f0dda7132432044a045d01c1f32be245c63250b65c1dfb93680d1a19", "068s1ml97yqxbjv50cn68pi2pwy105fh8jh468j179yxy0kcinm6", 1), storePathInfo{}, false},
		{"zero size", strings.Replace(real, "\n160\n", "\n0\n", 1), storePathInfo{}, false},
		{"more references than listed", strings.Replace(real, "\n1\n", "\n2\n", 1), storePathInfo{}, false},
		{"reference outside the store", strings.Replace(real, "/nix/store/zr2", "/tmp/zr2", 1), storePathInfo{}, false},
		{"no final newline", strings.TrimSuffix(real, "\n"), storePathInfo{}, false},
		{"empty", "", storePathInfo{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseDumpDB([]byte(tc.out), path)
			if (err == nil) != tc.ok {
				t.Fatalf("parseDumpDB: %v, want ok=%v", err, tc.ok)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("parseDumpDB (-want +got):\n%s", diff)
			}
		})
	}
}
