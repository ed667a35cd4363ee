package agent

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"github.com/klauspost/compress/zstd"
	"github.com/nix-community/go-nix/pkg/nar"
	"github.com/nix-community/go-nix/pkg/nixbase32"

	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
	"github.com/kilnci/kiln/rpc/gen/kiln/v1/kilnv1connect"
)

const storeDir = "/nix/store"

// ansi matches terminal colour codes in Nix's messages.
var ansi = regexp.MustCompile("\x1b\\[[0-9;]*m")

func nixVersion() string {
	out, err := exec.Command("nix-store", "--version").Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(out))
}

// nixArgs are the options every Nix call of a lease gets.
func (a *Agent) nixArgs(l *kilnv1.Lease) []string {
	args := a.storeArgs()
	var urls, keys []string
	for _, s := range l.Substituters {
		urls = append(urls, s.Url)
		keys = append(keys, s.TrustedPublicKeys...)
	}
	args = append(args, "--option", "substituters", strings.Join(urls, " "),
		"--option", "trusted-public-keys", strings.Join(keys, " "),
		"--option", "require-sigs", "true",
		"--option", "system-features", strings.Join(a.cfg.Features, " "))
	for _, o := range a.cfg.NixOptions {
		k, v, _ := strings.Cut(o, "=")
		args = append(args, "--option", k, v)
	}
	return args
}

// realPath is where a store path lives on this machine (chroot stores
// keep it under their root).
func (a *Agent) realPath(p string) string {
	if a.cfg.Store != "" && strings.HasPrefix(a.cfg.Store, "/") {
		return filepath.Join(a.cfg.Store, p)
	}
	return p
}

// runBuild builds one lease and reports its outcome.
func (a *Agent) runBuild(ctx context.Context, l *kilnv1.Lease) {
	log := a.log.With("lease", l.LeaseId, "step", l.DrvPath, "agent", a.id)
	log.Info("building", "attempt", l.Attempt)
	ls := newLogStreamer(a, l.LeaseId)
	outcome, msg := a.realise(ctx, l, ls)
	if ctx.Err() != nil {
		log.Warn("build stopped", "reason", context.Cause(ctx))
		if errors.Is(context.Cause(ctx), errHandBack) {
			a.handBack(l, ls)
		}
		return
	}
	// The final log is exactly what Nix recorded, when it recorded one.
	if recorded, err := a.readLog(ctx, l); err == nil && !bytes.Equal(recorded, ls.all()) {
		ls.replace(recorded)
	}
	if outcome == kilnv1.Outcome_OUTCOME_SUCCEEDED {
		for _, o := range l.Outputs {
			if err := a.upload(ctx, l, o.Path); err != nil {
				if connect.CodeOf(err) == connect.CodeFailedPrecondition {
					log.Warn("upload refused: the lease is no longer ours", "err", err)
					return
				}
				outcome, msg = kilnv1.Outcome_OUTCOME_TRANSIENT, fmt.Sprintf("uploading %s: %v", o.Path, err)
				break
			}
		}
	}
	if err := ls.flush(ctx, true); err != nil {
		log.Warn("sending the log failed", "err", err)
	}
	for attempt := 0; ; attempt++ {
		_, err := call(ctx, a, func(c kilnv1connect.AgentServiceClient) (*connect.Response[kilnv1.CompleteResponse], error) {
			return c.Complete(ctx, withBearer(&kilnv1.CompleteRequest{LeaseId: l.LeaseId, Outcome: outcome, Error: msg}, a.cred))
		})
		if err == nil {
			log.Info("build reported", "outcome", outcome.String(), "error", msg)
			return
		}
		if c := connect.CodeOf(err); c == connect.CodeFailedPrecondition || c == connect.CodePermissionDenied || c == connect.CodeInvalidArgument {
			log.Warn("completion refused", "err", err)
			return
		}
		log.Warn("completion failed, retrying", "err", err)
		// A new leader may have lost the live log: send it again.
		ls.resend()
		_ = ls.flush(ctx, true)
		if sleep(ctx, backoff(attempt)) != nil {
			return
		}
	}
}

// handBack tells the leader a drained lease is given back unfinished, so
// its step is queued again at once instead of after the lease TTL.
func (a *Agent) handBack(l *kilnv1.Lease, ls *logStreamer) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	_ = ls.flush(ctx, true)
	_, err := call(ctx, a, func(c kilnv1connect.AgentServiceClient) (*connect.Response[kilnv1.CompleteResponse], error) {
		return c.Complete(ctx, withBearer(&kilnv1.CompleteRequest{LeaseId: l.LeaseId, Outcome: kilnv1.Outcome_OUTCOME_RELEASED, Error: "agent drained"}, a.cred))
	})
	if err != nil {
		a.log.Warn("handing back the lease failed: it will expire", "lease", l.LeaseId, "step", l.DrvPath, "agent", a.id, "err", err)
		return
	}
	a.log.Info("lease handed back", "lease", l.LeaseId, "step", l.DrvPath, "agent", a.id)
}

// realise runs nix-store --realise and streams the builder's output.
func (a *Agent) realise(ctx context.Context, l *kilnv1.Lease, ls *logStreamer) (kilnv1.Outcome, string) {
	args := append(a.nixArgs(l), "--log-format", "internal-json", "--realise", l.DrvPath)
	if l.BuildTimeoutSeconds > 0 {
		args = append(args, "--timeout", strconv.FormatInt(l.BuildTimeoutSeconds, 10))
	}
	if l.MaxSilentSeconds > 0 {
		args = append(args, "--max-silent-time", strconv.FormatInt(l.MaxSilentSeconds, 10))
	}
	cmd := a.nixStore(ctx, args...)
	cmd.WaitDelay = 5 * time.Second
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return kilnv1.Outcome_OUTCOME_TRANSIENT, err.Error()
	}
	cmd.Stdout = io.Discard
	if err := cmd.Start(); err != nil {
		return kilnv1.Outcome_OUTCOME_TRANSIENT, "starting nix-store: " + err.Error()
	}
	stop := make(chan struct{})
	var flushWG sync.WaitGroup
	flushWG.Add(1)
	go func() { // live log: flushed twice a second
		defer flushWG.Done()
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				_ = ls.flush(ctx, false)
			case <-stop:
				return
			}
		}
	}()
	var errs []string
	sc := bufio.NewScanner(stderr)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		line, ok := strings.CutPrefix(sc.Text(), "@nix ")
		if !ok {
			continue
		}
		var ev struct {
			Action string `json:"action"`
			Type   int    `json:"type"`
			Level  int    `json:"level"`
			Msg    string `json:"msg"`
			Fields []any  `json:"fields"`
		}
		if json.Unmarshal([]byte(line), &ev) != nil {
			continue
		}
		switch {
		case ev.Action == "result" && ev.Type == 101 && len(ev.Fields) == 1: // a build log line
			if s, ok := ev.Fields[0].(string); ok {
				ls.add([]byte(s + "\n"))
			}
		case ev.Action == "msg" && ev.Level == 0: // errors
			errs = append(errs, ansi.ReplaceAllString(ev.Msg, ""))
		}
	}
	err = cmd.Wait()
	close(stop)
	flushWG.Wait()
	if err == nil {
		return kilnv1.Outcome_OUTCOME_SUCCEEDED, ""
	}
	msg := strings.TrimSpace(strings.Join(errs, "\n"))
	if len(msg) > 4096 {
		msg = msg[len(msg)-4096:]
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		// nix-store's exit status: 100 build failed, 101 timed out, 102
		// hash mismatch, 104 not deterministic; 1 is anything else
		// (substitution, I/O): worth retrying elsewhere.
		switch st := ee.ExitCode(); {
		case st == 101:
			return kilnv1.Outcome_OUTCOME_TIMED_OUT, msg
		case st >= 100 && st <= 104:
			return kilnv1.Outcome_OUTCOME_FAILED, msg
		}
	}
	return kilnv1.Outcome_OUTCOME_TRANSIENT, fmt.Sprintf("nix-store: %v: %s", err, msg)
}

// nixStore is a nix-store command with the agent's cache directory.
func (a *Agent) nixStore(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "nix-store", args...)
	cmd.Env = append(os.Environ(), "XDG_CACHE_HOME="+filepath.Join(a.cfg.WorkDir, "cache"))
	return cmd
}

// storeArgs puts --store STORE (when the agent has its own store) before args.
func (a *Agent) storeArgs(args ...string) []string {
	if a.cfg.Store == "" {
		return args
	}
	return append([]string{"--store", a.cfg.Store}, args...)
}

func (a *Agent) readLog(ctx context.Context, l *kilnv1.Lease) ([]byte, error) {
	return a.nixStore(ctx, a.storeArgs("--read-log", l.DrvPath)...).Output()
}

// upload dumps an output to a NAR and streams it up under the lease,
// compressed with zstd, while it compresses (keeping a copy on disk).
func (a *Agent) upload(ctx context.Context, l *kilnv1.Lease, path string) error {
	refs, err := a.references(ctx, path)
	if err != nil {
		return err
	}
	return a.sendOutput(ctx, l, path, refs, func(w io.Writer) error { return nar.DumpPath(w, a.realPath(path)) })
}

// sendOutput uploads the NAR dump writes as output path of the lease. The
// first attempt sends while it compresses; should it fail, the compressed
// copy kept on disk is sent again to the next coordinator.
func (a *Agent) sendOutput(ctx context.Context, l *kilnv1.Lease, path string, refs []string, dump func(io.Writer) error) error {
	deriver := strings.TrimPrefix(l.DrvPath, storeDir+"/")
	var packed *PackedNar
	var packErr error
	defer func() {
		if packed != nil {
			packed.Close()
		}
	}()
	_, err := call(ctx, a, func(c kilnv1connect.AgentServiceClient) (*connect.Response[kilnv1.UploadNarResponse], error) {
		if packed != nil {
			hdr, err := packed.Header(l.LeaseId, path, refs, deriver)
			if err != nil {
				packErr = err
				return nil, connect.NewError(connect.CodeCanceled, err)
			}
			return packed.Send(ctx, c, a.cred, hdr)
		}
		hdr := &kilnv1.NarHeader{LeaseId: l.LeaseId, StorePath: path, References: refs, Deriver: deriver}
		p, resp, err := StreamNar(ctx, c, a.cred, a.cfg.WorkDir, hdr, l.MaxNarBytes, dump)
		if p == nil {
			packErr = err
			return nil, connect.NewError(connect.CodeCanceled, err) // not worth another coordinator
		}
		packed = p
		return resp, err
	})
	if packErr != nil {
		return fmt.Errorf("dumping output %s: %w", path, packErr)
	}
	return err
}

type counter struct{ n uint64 }

func (c *counter) Write(p []byte) (int, error) { c.n += uint64(len(p)); return len(p), nil }

// PackedNar is a NAR compressed with zstd into a temp file, with the
// hashes and sizes an upload's header needs. FileHash, which only a resent
// upload needs (a streamed one is hashed by the coordinator that receives
// it, and its NAR checked against NarHash), is computed by Header.
type PackedNar struct {
	File     *os.File
	NarHash  string // sha256:<nixbase32>
	NarSize  uint64
	FileHash string
	FileSize uint64
}

// packNar runs dump (which writes a NAR) through zstd into a temp file in
// dir, hashing the NAR on the way, and writes the compressed bytes to tee
// as they are made (tee must not fail the packing: its errors are its own
// business). The file and tee are written by their own goroutine, so the
// encoder goes on compressing while a chunk is sent.
func packNar(dir string, dump func(io.Writer) error, tee io.Writer) (*PackedNar, error) {
	tmp, err := os.CreateTemp(dir, "nar-*.zst")
	if err != nil {
		return nil, err
	}
	os.Remove(tmp.Name()) // unlinked: gone when closed
	out := newAsyncWriter(io.MultiWriter(tmp, tee), 8)
	narHash := sha256.New()
	enc, err := zstd.NewWriter(out, zstd.WithEncoderConcurrency(2), zstd.WithEncoderLevel(NarLevel))
	if err != nil {
		out.Close()
		tmp.Close()
		return nil, err
	}
	cnt := &counter{}
	err = dump(io.MultiWriter(enc, narHash, cnt))
	if cerr := enc.Close(); err == nil {
		err = cerr
	}
	if werr := out.Close(); err == nil {
		err = werr
	}
	if err != nil {
		tmp.Close()
		return nil, err
	}
	size, err := tmp.Seek(0, io.SeekCurrent)
	if err != nil {
		tmp.Close()
		return nil, err
	}
	return &PackedNar{File: tmp, NarHash: "sha256:" + nixbase32.EncodeToString(narHash.Sum(nil)), NarSize: cnt.n, FileSize: uint64(size)}, nil
}

// NarLevel is the agents' zstd level for NARs: the fastest, zstd's level
// 1 or so. On BenchmarkNarIngest's NAR it compresses as well as the
// default level in about 60% of the time (docs/design.md, "Measured"),
// and an agent's upload is CPU-bound on the agent.
const NarLevel = zstd.SpeedFastest

// asyncWriter writes to w, in its own goroutine, copies of what is
// written to it. Close waits for the writes; the first error is returned
// by Close and by later Writes.
type asyncWriter struct {
	ch   chan []byte
	done chan struct{}
	err  atomic.Pointer[error] // the first write error
}

func newAsyncWriter(w io.Writer, depth int) *asyncWriter {
	a := &asyncWriter{ch: make(chan []byte, depth), done: make(chan struct{})}
	go func() {
		defer close(a.done)
		for b := range a.ch {
			if a.err.Load() == nil {
				if _, err := w.Write(b); err != nil {
					a.err.Store(&err)
				}
			}
		}
	}()
	return a
}

func (a *asyncWriter) Write(p []byte) (int, error) {
	if err := a.err.Load(); err != nil {
		return 0, *err
	}
	a.ch <- bytes.Clone(p)
	return len(p), nil
}

// Close waits for the queued writes and returns the first error.
func (a *asyncWriter) Close() error {
	close(a.ch)
	<-a.done
	if err := a.err.Load(); err != nil {
		return *err
	}
	return nil
}

// chunkSender sends what is written to it as UploadNar chunks of 1 MiB.
// After a failed send it drops what follows and keeps the error.
type chunkSender struct {
	stream *connect.ClientStreamForClient[kilnv1.UploadNarRequest, kilnv1.UploadNarResponse]
	buf    []byte
	err    error
}

// startUpload opens an UploadNar call and sends its header.
func startUpload(ctx context.Context, c kilnv1connect.AgentServiceClient, credential string, hdr *kilnv1.NarHeader) *chunkSender {
	stream := c.UploadNar(ctx)
	stream.RequestHeader().Set("Authorization", "Bearer "+credential)
	s := &chunkSender{stream: stream, buf: make([]byte, 0, 1<<20)}
	s.err = stream.Send(&kilnv1.UploadNarRequest{Part: &kilnv1.UploadNarRequest_Header{Header: hdr}})
	return s
}

func (s *chunkSender) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 && s.err == nil {
		k := min(len(p), 1<<20-len(s.buf))
		s.buf = append(s.buf, p[:k]...)
		p = p[k:]
		if len(s.buf) == 1<<20 {
			s.flush()
		}
	}
	return n, nil
}

func (s *chunkSender) flush() {
	if len(s.buf) > 0 && s.err == nil {
		s.err = s.stream.Send(&kilnv1.UploadNarRequest{Part: &kilnv1.UploadNarRequest_ZstdChunk{ZstdChunk: s.buf}})
	}
	s.buf = s.buf[:0]
}

// StreamNar packs a NAR (packNar) and sends it as one UploadNar call
// while it compresses: hdr leaves the hashes and sizes empty (they are not
// known yet) and a trailer brings them. The packed NAR is returned even
// when the sending failed, so it can be sent again from its file; it is
// nil, with the error, only when packing failed or the NAR is over
// maxBytes (0: no limit), and then the upload is abandoned.
func StreamNar(ctx context.Context, c kilnv1connect.AgentServiceClient, credential, dir string, hdr *kilnv1.NarHeader, maxBytes uint64, dump func(io.Writer) error) (*PackedNar, *connect.Response[kilnv1.UploadNarResponse], error) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sender := startUpload(sctx, c, credential, hdr)
	p, err := packNar(dir, dump, sender)
	if err == nil && maxBytes > 0 && max(p.NarSize, p.FileSize) > maxBytes {
		err = fmt.Errorf("%d bytes, over the %d-byte limit", max(p.NarSize, p.FileSize), maxBytes)
		p.Close()
		p = nil
	}
	if err != nil {
		cancel() // abandon the upload: no trailer is sent
		_, _ = sender.stream.CloseAndReceive()
		return nil, nil, err
	}
	sender.flush()
	if sender.err == nil {
		sender.err = sender.stream.Send(&kilnv1.UploadNarRequest{Part: &kilnv1.UploadNarRequest_Trailer{Trailer: &kilnv1.NarTrailer{
			NarHash: p.NarHash, NarSize: p.NarSize, FileSize: p.FileSize}}})
	}
	resp, err := sender.stream.CloseAndReceive()
	return p, resp, err
}

// Close removes the temp file.
func (p *PackedNar) Close() error { return p.File.Close() }

// Header is the UploadNar header for this NAR (computing FileHash from
// the file the first time).
func (p *PackedNar) Header(lease uint64, path string, refs []string, deriver string) (*kilnv1.NarHeader, error) {
	if p.FileHash == "" {
		if _, err := p.File.Seek(0, io.SeekStart); err != nil {
			return nil, err
		}
		h := sha256.New()
		if _, err := io.Copy(h, p.File); err != nil {
			return nil, fmt.Errorf("hashing the compressed NAR: %w", err)
		}
		p.FileHash = "sha256:" + nixbase32.EncodeToString(h.Sum(nil))
	}
	return &kilnv1.NarHeader{LeaseId: lease, StorePath: path, NarHash: p.NarHash, NarSize: p.NarSize,
		References: refs, Deriver: deriver, FileHash: p.FileHash, FileSize: p.FileSize}, nil
}

// Send streams a packed NAR as one UploadNar call.
func (p *PackedNar) Send(ctx context.Context, c kilnv1connect.AgentServiceClient, credential string, hdr *kilnv1.NarHeader) (*connect.Response[kilnv1.UploadNarResponse], error) {
	if _, err := p.File.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	sender := startUpload(ctx, c, credential, hdr)
	if sender.err == nil {
		// chunkSender never fails a write: an error here is the file's.
		if _, err := io.Copy(sender, p.File); err != nil {
			return nil, err
		}
		sender.flush()
	}
	return sender.stream.CloseAndReceive()
}

// references lists a built path's references as basenames.
func (a *Agent) references(ctx context.Context, path string) ([]string, error) {
	out, err := a.nixStore(ctx, a.storeArgs("--query", "--references", path)...).Output()
	if err != nil {
		return nil, fmt.Errorf("querying references of %s: %w", path, err)
	}
	var refs []string
	for _, r := range strings.Fields(string(out)) {
		refs = append(refs, strings.TrimPrefix(r, storeDir+"/"))
	}
	return refs, nil
}
