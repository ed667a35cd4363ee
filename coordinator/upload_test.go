package coordinator

import (
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/kilnci/kiln/agent"
	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
)

// sendParts sends an UploadNar call made of the given parts.
func (a *fakeAgent) sendParts(parts ...*kilnv1.UploadNarRequest) error {
	stream := a.client.UploadNar(context.Background())
	stream.RequestHeader().Set("Authorization", "Bearer "+a.cred)
	for _, p := range parts {
		if err := stream.Send(p); err != nil {
			break // the server answered early: CloseAndReceive has why
		}
	}
	_, err := stream.CloseAndReceive()
	return err
}

func headerPart(h *kilnv1.NarHeader) *kilnv1.UploadNarRequest {
	return &kilnv1.UploadNarRequest{Part: &kilnv1.UploadNarRequest_Header{Header: h}}
}

func chunkPart(b []byte) *kilnv1.UploadNarRequest {
	return &kilnv1.UploadNarRequest{Part: &kilnv1.UploadNarRequest_ZstdChunk{ZstdChunk: b}}
}

func trailerPart(tr *kilnv1.NarTrailer) *kilnv1.UploadNarRequest {
	return &kilnv1.UploadNarRequest{Part: &kilnv1.UploadNarRequest_Trailer{Trailer: tr}}
}

// TestStreamedUpload: an agent may send an output while it compresses it,
// with the hashes and sizes in a trailer. Malformed streams are refused
// and record nothing; the agent's own StreamNar is accepted and recorded
// with what its trailer said.
func TestStreamedUpload(t *testing.T) {
	tc := startCluster(t, 1, withCacheKey(t), withAgents)
	_, l := tc.leader(5 * time.Second)
	out := storePathFor("solo")
	node := &pb.DerivationNode{DrvPath: storePathFor("solo.drv"), System: "x86_64-linux", Outputs: []*pb.Output{{Name: "out", Path: out}}}
	if _, err := l.SubmitBuild(context.Background(), &pb.SubmitBuild{Build: &pb.Build{DrvPath: node.DrvPath}, Graph: []*pb.DerivationNode{node}}); err != nil {
		t.Fatal(err)
	}
	a := registerAgent(t, l.HTTPAddr())
	ls, err := a.lease(5)
	if err != nil || len(ls) != 1 {
		t.Fatalf("lease: %v %v", ls, err)
	}
	lease := ls[0].LeaseId
	n := makeNar(t, "solo", nil)
	fh := sha256.Sum256(n.zst)
	nh := sha256.Sum256(n.nar)
	good := &kilnv1.NarTrailer{
		NarHash: "sha256:" + nixbase32.EncodeToString(nh[:]), NarSize: uint64(len(n.nar)),
		FileHash: "sha256:" + nixbase32.EncodeToString(fh[:]), FileSize: uint64(len(n.zst)),
	}
	streamed := headerPart(&kilnv1.NarHeader{LeaseId: lease, StorePath: out})
	withHashes := headerPart(&kilnv1.NarHeader{LeaseId: lease, StorePath: out, NarHash: good.NarHash, NarSize: good.NarSize, FileHash: good.FileHash, FileSize: good.FileSize})
	other := makeNar(t, "other", nil)
	oh := sha256.Sum256(other.zst)
	half := len(n.zst) / 2

	for _, tc := range []struct {
		name  string
		parts []*kilnv1.UploadNarRequest
		want  connect.Code
	}{
		{"no trailer", []*kilnv1.UploadNarRequest{streamed, chunkPart(n.zst)}, connect.CodeInvalidArgument},
		{"trailer with another file's hash", []*kilnv1.UploadNarRequest{streamed, chunkPart(n.zst), trailerPart(&kilnv1.NarTrailer{
			NarHash: good.NarHash, NarSize: good.NarSize, FileHash: "sha256:" + nixbase32.EncodeToString(oh[:]), FileSize: good.FileSize,
		})}, connect.CodeInvalidArgument},
		{"trailer with a wrong size", []*kilnv1.UploadNarRequest{streamed, chunkPart(n.zst), trailerPart(&kilnv1.NarTrailer{
			NarHash: good.NarHash, NarSize: good.NarSize, FileHash: good.FileHash, FileSize: good.FileSize + 1,
		})}, connect.CodeInvalidArgument},
		{"trailer with a wrong NarHash", []*kilnv1.UploadNarRequest{streamed, chunkPart(n.zst), trailerPart(&kilnv1.NarTrailer{
			NarHash: "sha256:" + nixbase32.EncodeToString(fh[:]), NarSize: good.NarSize, FileHash: good.FileHash, FileSize: good.FileSize,
		})}, connect.CodeInvalidArgument},
		{"part after the trailer", []*kilnv1.UploadNarRequest{streamed, chunkPart(n.zst), trailerPart(good), chunkPart([]byte("x"))}, connect.CodeInvalidArgument},
		{"trailer after a header with hashes", []*kilnv1.UploadNarRequest{withHashes, chunkPart(n.zst), trailerPart(good)}, connect.CodeInvalidArgument},
		{"second header", []*kilnv1.UploadNarRequest{streamed, chunkPart(n.zst[:half]), streamed, chunkPart(n.zst[half:]), trailerPart(good)}, connect.CodeInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := a.sendParts(tc.parts...); connect.CodeOf(err) != tc.want {
				t.Fatalf("upload: %v, want %v", err, tc.want)
			}
			if _, err := l.fsm.Read().NarInfo(raftfsm.HashPart(out)); !errors.Is(err, raftfsm.ErrNotFound) {
				t.Fatalf("narinfo after a refused upload: %v, want not found", err)
			}
		})
	}

	// The agent's own streaming upload.
	packed, _, err := agent.StreamNar(context.Background(), a.client, a.cred, t.TempDir(),
		&kilnv1.NarHeader{LeaseId: lease, StorePath: out}, 0, func(w io.Writer) error { _, err := w.Write(n.nar); return err })
	if err != nil {
		t.Fatalf("StreamNar: %v", err)
	}
	defer packed.Close()
	rec, err := l.fsm.Read().NarInfo(raftfsm.HashPart(out))
	if err != nil {
		t.Fatal(err)
	}
	if rec.NarHash != good.NarHash || rec.NarSize != good.NarSize || rec.FileHash != packed.FileHash || rec.FileSize != packed.FileSize {
		t.Fatalf("recorded %s/%d, %s/%d; the agent packed %s/%d, %s/%d", rec.NarHash, rec.NarSize, rec.FileHash, rec.FileSize,
			packed.NarHash, packed.NarSize, packed.FileHash, packed.FileSize)
	}
	if !l.blobs.Has(rec.Blob) {
		t.Fatal("the recorded blob is not stored")
	}
}
