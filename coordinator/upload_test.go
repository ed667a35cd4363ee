package coordinator

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/google/go-cmp/cmp"
	"github.com/klauspost/compress/zstd"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/kilnci/kiln/agent"
	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
	"github.com/kilnci/kiln/rpc"
	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
	"github.com/kilnci/kiln/rpc/gen/kiln/v1/kilnv1connect"
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

	// The agent's own streaming upload: the store's NarHash and NarSize
	// in the trailer, no FileHash.
	if _, err := agent.StreamNar(context.Background(), a.client, a.cred, &kilnv1.NarHeader{LeaseId: lease, StorePath: out},
		good.NarHash, good.NarSize, func(w io.Writer) error { _, err := w.Write(n.nar); return err }); err != nil {
		t.Fatalf("StreamNar: %v", err)
	}
	rec, err := l.fsm.Read().NarInfo(raftfsm.HashPart(out))
	if err != nil {
		t.Fatal(err)
	}
	// The coordinator's own FileHash is recorded: the hash of the bytes
	// it stored, which decompress to the NAR.
	f, size, err := l.blobs.Open(rec.Blob)
	if err != nil {
		t.Fatalf("the recorded blob is not stored: %v", err)
	}
	stored, err := io.ReadAll(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	sh := sha256.Sum256(stored)
	if rec.NarHash != good.NarHash || rec.NarSize != good.NarSize || rec.FileHash != "sha256:"+nixbase32.EncodeToString(sh[:]) || rec.FileSize != uint64(size) {
		t.Fatalf("recorded %s/%d, %s/%d; the store registered %s/%d and the blob is %x/%d", rec.NarHash, rec.NarSize, rec.FileHash, rec.FileSize,
			good.NarHash, good.NarSize, sh, size)
	}
	dec, err := zstd.NewReader(bytes.NewReader(stored))
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	if got, err := io.ReadAll(dec); err != nil || !bytes.Equal(got, n.nar) {
		t.Fatalf("the stored blob does not decompress to the NAR (%v)", err)
	}
	if !l.blobs.Has(rec.Blob) {
		t.Fatal("the recorded blob is not stored")
	}
}

// TestRefusedStreamsAnswer: an agent's client streams refused at their
// first message (a lease the agent does not hold) fail at the agent with
// the leader's FailedPrecondition, sent to the leader or through a
// follower, over HTTP/1.1, where a coordinator closes a connection whose
// request it did not read to the end: it pauses first, and the agent
// reads the answer while it sends (else it sees the connection reset, or
// the follower's 502 or a cut answer, and tries elsewhere). An upload's
// refusal is not a failed dump, and the dump is stopped instead of
// compressed to the end; a log's is a big resend's, as after a leader
// change.
func TestRefusedStreamsAnswer(t *testing.T) {
	tc := startCluster(t, 3, withAgents)
	_, l := tc.leader(10 * time.Second)
	a := registerAgent(t, l.HTTPAddr())
	const notOurs = 1 << 40 // a lease ID
	streams := []struct {
		name string
		send func(t *testing.T, client kilnv1connect.AgentServiceClient)
	}{
		{"upload", func(t *testing.T, client kilnv1connect.AgentServiceClient) {
			rng := rand.NewChaCha8([32]byte{1})
			piece := make([]byte, 1<<20) // random: it compresses to as much
			const pieces = 256
			written := 0
			_, err := agent.StreamNar(context.Background(), client, a.cred, &kilnv1.NarHeader{LeaseId: notOurs, StorePath: storePathFor("refused")},
				"sha256:"+nixbase32.EncodeToString(make([]byte, 32)), pieces<<20, func(w io.Writer) error {
					for ; written < pieces; written++ {
						_, _ = rng.Read(piece)
						if _, err := w.Write(piece); err != nil {
							return err
						}
					}
					return nil
				})
			if connect.CodeOf(err) != connect.CodeFailedPrecondition || errors.Is(err, agent.ErrDump) {
				t.Fatalf("StreamNar under a lease the agent does not hold: %v, want %v", err, connect.CodeFailedPrecondition)
			}
			if written == pieces {
				t.Fatalf("the dump wrote all %d MiB after the upload was refused", pieces)
			}
		}},
		{"log", func(t *testing.T, client kilnv1connect.AgentServiceClient) {
			data := make([]byte, 64<<10)
			chunks := make([]*kilnv1.LogChunk, 512) // 32 MiB
			for i := range chunks {
				chunks[i] = &kilnv1.LogChunk{LeaseId: notOurs, Seq: uint64(i), Data: data}
			}
			if _, err := agent.SendLog(context.Background(), client, a.cred, chunks); connect.CodeOf(err) != connect.CodeFailedPrecondition {
				t.Fatalf("SendLog under a lease the agent does not hold: %v, want %v", err, connect.CodeFailedPrecondition)
			}
		}},
	}
	for _, node := range []struct {
		name string
		pick func() (int, *Coordinator) // now: a busy subtest may have cost the leader its term
	}{{"leader", func() (int, *Coordinator) { return tc.leader(10 * time.Second) }}, {"follower", tc.follower}} {
		for _, stream := range streams {
			_, c := node.pick()
			t.Run(node.name+"/"+stream.name, func(t *testing.T) {
				tr := &http.Transport{} // HTTP/1.1, a connection of its own
				t.Cleanup(tr.CloseIdleConnections)
				// Under the agents' transport, which sends the streams'
				// bodies itself.
				hc := &http.Client{Transport: &rpc.StreamTransport{Base: tr}}
				stream.send(t, kilnv1connect.NewAgentServiceClient(hc, "http://"+c.HTTPAddr()))
			})
		}
	}
}

// TestStreamedUploadCopiesWhileArriving: on a 3-node cluster a streamed
// upload reaches the other voters while it is still arriving (each peer
// holds a partial copy before the agent has sent its trailer), the record
// names a blob a quorum holds when the call returns, and with one peer
// down the other makes the quorum.
func TestStreamedUploadCopiesWhileArriving(t *testing.T) {
	// Several MiB through three nodes: with the tests' short Raft
	// timeouts the race detector's slowdown could depose the leader
	// mid-upload, which is not what this test is about.
	tc := startCluster(t, 3, withCacheKey(t), withAgents, withDefaultRaftTimeouts)
	li, l := tc.leader(10 * time.Second)
	outs := []string{storePathFor("big-1"), storePathFor("big-2")}
	for i, out := range outs {
		node := &pb.DerivationNode{DrvPath: storePathFor(fmt.Sprintf("big-%d.drv", i+1)), System: "x86_64-linux", Outputs: []*pb.Output{{Name: "out", Path: out}}}
		if _, err := l.SubmitBuild(context.Background(), &pb.SubmitBuild{Build: &pb.Build{DrvPath: node.DrvPath}, Graph: []*pb.DerivationNode{node}}); err != nil {
			t.Fatal(err)
		}
	}
	a := registerAgent(t, l.HTTPAddr())
	leaseOf := map[string]uint64{}
	for range outs {
		ls, err := a.lease(5)
		if err != nil || len(ls) != 1 {
			t.Fatalf("lease: %v %v", ls, err)
		}
		leaseOf[ls[0].Outputs[0].Path] = ls[0].LeaseId
	}
	// Incompressible contents: several 1 MiB chunks.
	content := make([]byte, 3<<20)
	rng := rand.New(rand.NewPCG(5, 6))
	for i := range content {
		content[i] = byte(rng.Uint32())
	}
	first := fileNar(t, content, false)
	var zst bytes.Buffer
	enc, _ := zstd.NewWriter(&zst)
	enc.Write(first)
	enc.Close()
	nh := sha256.Sum256(first)

	// The chunks, but not yet the trailer.
	stream := a.client.UploadNar(context.Background())
	stream.RequestHeader().Set("Authorization", "Bearer "+a.cred)
	if err := stream.Send(headerPart(&kilnv1.NarHeader{LeaseId: leaseOf[outs[0]], StorePath: outs[0]})); err != nil {
		t.Fatal(err)
	}
	for b := zst.Bytes(); len(b) > 0; {
		k := min(len(b), 1<<20)
		if err := stream.Send(chunkPart(b[:k])); err != nil {
			t.Fatal(err)
		}
		b = b[k:]
	}
	partial := func(i int) bool {
		entries, _ := os.ReadDir(filepath.Join(tc.cfgs[i].DataDir, "blobs", "tmp"))
		for _, e := range entries {
			if info, err := e.Info(); err == nil && info.Size() > 0 {
				return true
			}
		}
		return false
	}
	for i := range tc.nodes {
		if i != li {
			tc.waitFor(10*time.Second, fmt.Sprintf("node %d holding part of the upload before its trailer", i), func() bool { return partial(i) })
		}
	}
	if err := stream.Send(trailerPart(&kilnv1.NarTrailer{NarHash: "sha256:" + nixbase32.EncodeToString(nh[:]), NarSize: uint64(len(first)), FileSize: uint64(zst.Len())})); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.CloseAndReceive(); err != nil {
		t.Fatalf("upload: %v", err)
	}
	rec, err := l.fsm.Read().NarInfo(raftfsm.HashPart(outs[0]))
	if err != nil {
		t.Fatal(err)
	}
	holders := func() int {
		n := 0
		for _, c := range tc.nodes {
			if c != nil && c.blobs.Has(rec.Blob) {
				n++
			}
		}
		return n
	}
	if n := holders(); n < 2 {
		t.Fatalf("%d nodes hold the blob when the upload returns, want a quorum (2)", n)
	}
	tc.waitFor(10*time.Second, "every node holding the blob", func() bool { return holders() == 3 })
	// Both peers took the streamed copy (checked by CRC-32C, stored under
	// the leader's name); nothing was pushed afterwards.
	copies := func(how, result string) int {
		return int(testutil.ToFloat64(l.metrics.blobCopies.WithLabelValues(how, result)))
	}
	tc.waitFor(10*time.Second, "two streamed copies counted", func() bool { return copies("streamed", "ok") == 2 })
	if n := copies("pushed", "ok") + copies("pushed", "failed") + copies("streamed", "failed"); n != 0 {
		t.Fatalf("%d copies pushed or failed, want none", n)
	}

	// One peer down: the other makes the quorum.
	down := (li + 1) % 3
	tc.stop(down)
	content[0] ^= 1
	second := fileNar(t, content, false)
	sh := sha256.Sum256(second)
	if _, err := agent.StreamNar(context.Background(), a.client, a.cred, &kilnv1.NarHeader{LeaseId: leaseOf[outs[1]], StorePath: outs[1]},
		"sha256:"+nixbase32.EncodeToString(sh[:]), uint64(len(second)), func(w io.Writer) error { _, err := w.Write(second); return err }); err != nil {
		t.Fatalf("StreamNar with a peer down: %v", err)
	}
	rec, err = l.fsm.Read().NarInfo(raftfsm.HashPart(outs[1]))
	if err != nil {
		t.Fatal(err)
	}
	if n := holders(); n != 2 {
		t.Fatalf("%d running nodes hold the blob, want both", n)
	}
	if ok, failed, pushed := copies("streamed", "ok"), copies("streamed", "failed"), copies("pushed", "ok")+copies("pushed", "failed"); ok != 3 || failed != 1 || pushed != 0 {
		t.Fatalf("streamed copies %d ok, %d failed, %d pushed; want 3, 1 (the stopped peer), 0", ok, failed, pushed)
	}
}

// TestInternalBlobUpload: a streamed blob copy between coordinators needs
// the cluster credential, is stored under its own hash, and is bounded.
func TestInternalBlobUpload(t *testing.T) {
	tc := startCluster(t, 1, func(_ int, cfg *Config) { cfg.MaxNarSize = 1 << 20 })
	_, l := tc.leader(5 * time.Second)
	body := []byte("a blob copy")
	sum := sha256.Sum256(body)
	post := func(token string, body io.Reader) *http.Response {
		req, err := http.NewRequest(http.MethodPost, "http://"+l.HTTPAddr()+"/internal/v1/blobs", body)
		if err != nil {
			t.Fatal(err)
		}
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	for _, tc := range []struct {
		name   string
		token  string
		body   io.Reader
		status int
	}{
		{"no credential", "", bytes.NewReader(body), http.StatusUnauthorized},
		{"wrong credential", "nope", bytes.NewReader(body), http.StatusForbidden},
		{"over the limit", testToken, io.LimitReader(zeroReader{}, 2<<20), http.StatusRequestEntityTooLarge},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if resp := post(tc.token, tc.body); resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d", resp.StatusCode, tc.status)
			}
			if l.blobs.Has(hex.EncodeToString(sum[:])) {
				t.Fatal("a refused copy was stored")
			}
		})
	}
	resp := post(testToken, bytes.NewReader(body))
	var got storedBlob
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, %v", resp.StatusCode, err)
	}
	want := storedBlob{Name: hex.EncodeToString(sum[:]), Size: int64(len(body))}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("answer (-want +got):\n%s", diff)
	}
	if !l.blobs.Has(want.Name) {
		t.Fatal("the copy is not stored")
	}

	// A streamed copy names itself in trailers, with its CRC-32C.
	crcOf := func(b []byte) string {
		return crcString(crc32.Checksum(b, castagnoli))
	}
	trailed := func(body []byte, name, crc string) *http.Response {
		// A body of unknown length: sent chunked, which trailers need.
		req, err := http.NewRequest(http.MethodPost, "http://"+l.HTTPAddr()+"/internal/v1/blobs", io.MultiReader(bytes.NewReader(body)))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+testToken)
		req.Trailer = http.Header{blobNameTrailer: {name}, blobCRCTrailer: {crc}}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	other := []byte("another blob copy")
	osum := sha256.Sum256(other)
	oname := hex.EncodeToString(osum[:])
	for _, tc := range []struct {
		name, blob, crc string
	}{
		{"wrong checksum", oname, crcOf(body)},
		{"no name", "", crcOf(other)},
		{"no checksum", oname, ""},
		{"not a blob name", "../" + oname[3:], crcOf(other)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if resp := trailed(other, tc.blob, tc.crc); resp.StatusCode != http.StatusBadRequest {
				t.Fatalf("status %d, want 400", resp.StatusCode)
			}
			if l.blobs.Has(oname) {
				t.Fatal("a refused copy was stored")
			}
		})
	}
	resp = trailed(other, oname, crcOf(other))
	got = storedBlob{}
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, %v", resp.StatusCode, err)
	}
	if diff := cmp.Diff(storedBlob{Name: oname, Size: int64(len(other))}, got); diff != "" {
		t.Fatalf("answer (-want +got):\n%s", diff)
	}
	// The peer does not hash a streamed copy: one named wrongly (by a
	// sender that hashed wrongly) is stored, and a scrub finds it.
	wrong := strings.Repeat("ab", 32)
	if resp := trailed(other, wrong, crcOf(other)); resp.StatusCode != http.StatusOK || !l.blobs.Has(wrong) {
		t.Fatalf("status %d, stored %v", resp.StatusCode, l.blobs.Has(wrong))
	}
	rep, err := l.Scrub(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{wrong}, rep.Corrupt); diff != "" || l.blobs.Has(wrong) || !l.blobs.Has(oname) {
		t.Fatalf("scrub found corrupt (-want +got):\n%s(still stored: %v)", diff, l.blobs.Has(wrong))
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
