package agent

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
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
	"time"

	"connectrpc.com/connect"
	"github.com/klauspost/compress/zstd"
	"github.com/nix-community/go-nix/pkg/nar"
	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/kilnci/kiln/rpc"
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
// compressed with zstd while it is sent.
func (a *Agent) upload(ctx context.Context, l *kilnv1.Lease, path string) error {
	info, err := a.pathInfo(ctx, path)
	if err != nil {
		return err
	}
	return a.sendOutput(ctx, l, path, info, func(w io.Writer) error { return nar.DumpPath(w, a.realPath(path)) })
}

// sendOutput uploads the NAR dump writes as output path of the lease,
// streaming it while it compresses. Should a coordinator fail the upload,
// the next one gets the output dumped again (store paths do not change).
func (a *Agent) sendOutput(ctx context.Context, l *kilnv1.Lease, path string, info storePathInfo, dump func(io.Writer) error) error {
	if l.MaxNarBytes > 0 && info.NarSize > l.MaxNarBytes {
		return fmt.Errorf("output %s: its NAR is %d bytes, over the lease's %d-byte limit", path, info.NarSize, l.MaxNarBytes)
	}
	hdr := &kilnv1.NarHeader{LeaseId: l.LeaseId, StorePath: path, References: info.References,
		Deriver: strings.TrimPrefix(l.DrvPath, storeDir+"/")}
	_, err := call(ctx, a, func(c kilnv1connect.AgentServiceClient) (*kilnv1.UploadNarResponse, error) {
		resp, err := StreamNar(ctx, c, a.cred, hdr, info.NarHash, info.NarSize, dump)
		if errors.Is(err, ErrDump) {
			return nil, connect.NewError(connect.CodeCanceled, err) // not worth another coordinator
		}
		return resp, err
	})
	return err
}

// ErrDump is a failure to dump and compress an output (not to send it).
var ErrDump = errors.New("dumping the output")

// NarLevel is the agents' zstd level for NARs: the fastest, zstd's level
// 1 or so. On BenchmarkNarIngest's NAR it compresses as well as the
// default level in about 60% of the time (docs/design.md, "Measured"),
// and an agent's upload is CPU-bound on the agent.
const NarLevel = zstd.SpeedFastest

// NarEncoderOptions are the agents' zstd options for NARs: NarLevel, and
// no frame checksum (the receiving coordinator checks the whole NAR
// against its NarHash, which covers what the checksum would).
func NarEncoderOptions() []zstd.EOption {
	return []zstd.EOption{zstd.WithEncoderLevel(NarLevel), zstd.WithEncoderCRC(false)}
}

// compressNar runs dump (which writes a NAR) through zstd to w, returning
// the NAR's size. The NAR is compressed as independent frames, several at
// once, and written to w from another goroutine (frameWriter).
func compressNar(dump func(io.Writer) error, w *chunkSender) (uint64, error) {
	enc, err := newFrameWriter(w, frameWorkers(), NarEncoderOptions()...)
	if err != nil {
		return 0, err
	}
	cnt := &counter{}
	err = dump(io.MultiWriter(enc, cnt))
	enc.Close()
	return cnt.n, err
}

type counter struct{ n uint64 }

func (c *counter) Write(p []byte) (int, error) { c.n += uint64(len(p)); return len(p), nil }

// chunkSender sends each write (a compressed frame) as UploadNar chunks
// of at most rpc.MaxNarChunk, straight from the writer's buffer (Send has
// copied a message out when it returns), counting the bytes. After a
// failed send it drops what follows and keeps the error (Err).
type chunkSender struct {
	s *streamSender
	n uint64
}

func (c *chunkSender) Write(p []byte) (int, error) {
	n := len(p)
	c.n += uint64(n)
	for len(p) > 0 && c.s.err == nil {
		k := min(len(p), rpc.MaxNarChunk)
		c.s.Send(&kilnv1.UploadNarRequest{Part: &kilnv1.UploadNarRequest_ZstdChunk{ZstdChunk: p[:k]}})
		p = p[k:]
	}
	return n, nil
}

// Err is the failed send's error, or nil.
func (c *chunkSender) Err() error { return c.s.err }

// StreamNar sends the NAR dump writes, compressed with zstd while it is
// sent, as one UploadNar call (a streamCall: a refusal is read as it
// comes, and stops the dump). hdr names the lease and the path (and its
// references and deriver) and leaves the hashes and sizes empty: a trailer
// brings narHash and narSize, what the store registered for the path, and
// the compressed size. The coordinator hashes the compressed bytes itself
// and checks the NAR against narHash, so the agent hashes nothing. A dump
// that fails, or whose size is not narSize, abandons the upload (no
// trailer is sent) with an error wrapping ErrDump.
func StreamNar(ctx context.Context, c kilnv1connect.AgentServiceClient, credential string, hdr *kilnv1.NarHeader, narHash string, narSize uint64, dump func(io.Writer) error) (*kilnv1.UploadNarResponse, error) {
	open := func(ctx context.Context) (connect.StreamingClientConn, error) { return c.UploadNar(ctx).Conn() }
	return streamCall[kilnv1.UploadNarResponse](ctx, credential, open, func(s *streamSender) error {
		s.Send(&kilnv1.UploadNarRequest{Part: &kilnv1.UploadNarRequest_Header{Header: hdr}})
		w := &chunkSender{s: s}
		// After a failed send the dump stops, and its error is not
		// the one returned: the answer says why.
		n, err := compressNar(dump, w)
		if err == nil && n != narSize {
			err = fmt.Errorf("the NAR is %d bytes, but the store registered %d", n, narSize)
		}
		if err != nil {
			return fmt.Errorf("%w: %w", ErrDump, err)
		}
		s.Send(&kilnv1.UploadNarRequest{Part: &kilnv1.UploadNarRequest_Trailer{Trailer: &kilnv1.NarTrailer{
			NarHash: narHash, NarSize: narSize, FileSize: w.n}}})
		return nil
	})
}

// storePathInfo is what the agent's store registered for a path.
type storePathInfo struct {
	NarHash    string // sha256:<nixbase32>
	NarSize    uint64
	References []string // basenames
}

// pathInfo asks the store what it registered for a built path (one
// nix-store call: its hash and size of the NAR, computed by Nix when the
// path was added, and its references).
func (a *Agent) pathInfo(ctx context.Context, path string) (storePathInfo, error) {
	out, err := a.nixStore(ctx, a.storeArgs("--dump-db", path)...).Output()
	if err != nil {
		return storePathInfo{}, fmt.Errorf("querying the store about %s: %w", path, err)
	}
	info, err := parseDumpDB(out, path)
	if err != nil {
		return storePathInfo{}, fmt.Errorf("querying the store about %s: %w", path, err)
	}
	return info, nil
}

// parseDumpDB reads `nix-store --dump-db path`: the path, its NAR's
// SHA-256 in hex, the NAR's size, the deriver (maybe empty), the number of
// references, and the references, a line each.
func parseDumpDB(out []byte, path string) (storePathInfo, error) {
	lines := strings.Split(string(out), "\n")
	if len(lines) < 6 || lines[len(lines)-1] != "" {
		return storePathInfo{}, fmt.Errorf("unexpected --dump-db output (%d lines)", len(lines))
	}
	lines = lines[:len(lines)-1]
	if lines[0] != path {
		return storePathInfo{}, fmt.Errorf("--dump-db names %.200q, not %s", lines[0], path)
	}
	sum, err := hex.DecodeString(lines[1])
	if err != nil || len(sum) != sha256.Size {
		return storePathInfo{}, fmt.Errorf("--dump-db: %.100q is not a SHA-256 in hex", lines[1])
	}
	size, err := strconv.ParseUint(lines[2], 10, 64)
	if err != nil || size == 0 {
		return storePathInfo{}, fmt.Errorf("--dump-db: bad NAR size %.100q", lines[2])
	}
	nrefs, err := strconv.Atoi(lines[4])
	if err != nil || nrefs < 0 || nrefs != len(lines)-5 {
		return storePathInfo{}, fmt.Errorf("--dump-db: %.100q references, with %d lines left", lines[4], len(lines)-5)
	}
	info := storePathInfo{NarHash: "sha256:" + nixbase32.EncodeToString(sum), NarSize: size}
	for _, r := range lines[5:] {
		base, ok := strings.CutPrefix(r, storeDir+"/")
		if !ok || base == "" || strings.Contains(base, "/") {
			return storePathInfo{}, fmt.Errorf("--dump-db: reference %.200q is not a store path", r)
		}
		info.References = append(info.References, base)
	}
	return info, nil
}
