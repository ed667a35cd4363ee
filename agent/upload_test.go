package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"

	"connectrpc.com/connect"
	"github.com/google/go-cmp/cmp"
	"github.com/klauspost/compress/zstd"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"google.golang.org/protobuf/testing/protocmp"

	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
	"github.com/kilnci/kiln/rpc/gen/kiln/v1/kilnv1connect"
)

// received is one UploadNar call as a coordinator saw it.
type received struct {
	header  *kilnv1.NarHeader
	body    []byte
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

func TestSendOutputResendsItsCopy(t *testing.T) {
	a, f := newUploadAgent(t)
	// Incompressible, so the upload takes several 1 MiB chunks.
	nar := make([]byte, 3<<20+12345)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range nar {
		nar[i] = byte(rng.Uint32())
	}
	lease := &kilnv1.Lease{LeaseId: 7, DrvPath: "/nix/store/00000000000000000000000000000000-x.drv"}
	path := "/nix/store/00000000000000000000000000000000-x"
	err := a.sendOutput(context.Background(), lease, path, []string{"dep"}, func(w io.Writer) error { _, err := w.Write(nar); return err })
	if err != nil {
		t.Fatalf("sendOutput: %v", err)
	}
	if len(f.got) != 2 {
		t.Fatalf("%d uploads, want 2 (a streamed one that failed, then the copy)", len(f.got))
	}
	first, second := f.got[0], f.got[1]
	nh := sha256.Sum256(nar)
	fh := sha256.Sum256(second.body)
	want := &kilnv1.NarHeader{LeaseId: 7, StorePath: path, References: []string{"dep"}, Deriver: "00000000000000000000000000000000-x.drv",
		NarHash: "sha256:" + nixbase32.EncodeToString(nh[:]), NarSize: uint64(len(nar)),
		FileHash: "sha256:" + nixbase32.EncodeToString(fh[:]), FileSize: uint64(len(second.body))}
	if diff := cmp.Diff(want, second.header, protocmp.Transform()); diff != "" {
		t.Errorf("the resent upload's header (-want +got):\n%s", diff)
	}
	if second.trailer != nil {
		t.Errorf("the resent upload has a trailer %v", second.trailer)
	}
	streamed := &kilnv1.NarHeader{LeaseId: 7, StorePath: path, References: []string{"dep"}, Deriver: want.Deriver}
	if diff := cmp.Diff(streamed, first.header, protocmp.Transform()); diff != "" {
		t.Errorf("the streamed upload's header (-want +got):\n%s", diff)
	}
	// The streamed trailer leaves FileHash out: the receiving coordinator
	// hashes what arrives and checks the NAR against NarHash.
	wantTrailer := &kilnv1.NarTrailer{NarHash: want.NarHash, NarSize: want.NarSize, FileSize: want.FileSize}
	if diff := cmp.Diff(wantTrailer, first.trailer, protocmp.Transform()); diff != "" {
		t.Errorf("the streamed upload's trailer (-want +got):\n%s", diff)
	}
	if len(second.body) <= 2<<20 {
		t.Errorf("the upload is %d bytes: the test wants several chunks", len(second.body))
	}
	if !bytes.Equal(first.body, second.body) {
		t.Errorf("the streamed bytes (%d) differ from the resent ones (%d)", len(first.body), len(second.body))
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

func TestSendOutputStopsWhenPackingFails(t *testing.T) {
	a, f := newUploadAgent(t)
	broken := errors.New("the output vanished")
	lease := &kilnv1.Lease{LeaseId: 8, DrvPath: "/nix/store/00000000000000000000000000000000-y.drv"}
	err := a.sendOutput(context.Background(), lease, "/nix/store/00000000000000000000000000000000-y", nil, func(w io.Writer) error {
		_, _ = w.Write([]byte("the start of a NAR"))
		return broken
	})
	if !errors.Is(err, broken) {
		t.Fatalf("sendOutput = %v, want the dump's error", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, r := range f.got {
		if r.trailer != nil {
			t.Fatalf("an abandoned upload was completed with a trailer: %v", r.trailer)
		}
	}
	if n := f.calls.Load(); n > 1 {
		t.Fatalf("%d upload calls, want at most 1 (no other coordinator is tried)", n)
	}
}
