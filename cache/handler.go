package cache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// Index is the local replica's view of the cache records.
type Index interface {
	NarInfo(hashPart string) (*pb.NarInfo, error)
	Log(drvPath string) (*pb.LogRecord, error)
}

// Publisher makes uploads durable: it copies the blob to a quorum of
// coordinators and commits the record through Raft.
type Publisher interface {
	// ReplicateBlob copies a blob this node holds to a quorum of
	// coordinators (size -1 when unknown).
	ReplicateBlob(ctx context.Context, blob string, size int64) error
	// CommitNar commits a record whose blob is replicated. leaseID, when
	// not 0, is the agent lease the upload is made under: the record is
	// refused unless that lease is current.
	CommitNar(ctx context.Context, rec *pb.NarInfo, leaseID uint64) error
	// PublishLog replicates a log's blob and commits its record.
	PublishLog(ctx context.Context, rec *pb.LogRecord) error
}

// Config is what a Handler serves from.
type Config struct {
	Index     func() Index
	Blobs     BlobStore
	Signer    *Signer // nil: uploads are refused
	Publisher Publisher
	// Authorize checks a push credential; it returns an error wrapping
	// raftfsm.ErrUnauthenticated or ErrForbidden.
	Authorize  func(*http.Request) error
	Priority   int
	MaxNarSize int64 // bound on a compressed NAR file and on the NAR inside
	MaxLogSize int64
	Log        *slog.Logger
	// Metrics, when set, counts requests and uploaded bytes.
	Metrics Metrics
}

// Metrics receives what the handler counts.
type Metrics interface {
	Request(kind string, hit bool)
	Uploaded(bytes int64)
	Served(bytes int64)
}

type noMetrics struct{}

func (noMetrics) Request(string, bool) {}
func (noMetrics) Uploaded(int64)       {}
func (noMetrics) Served(int64)         {}

// countingWriter counts body bytes, keeping the sendfile path (ReadFrom).
type countingWriter struct {
	http.ResponseWriter
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.n += int64(n)
	return n, err
}

func (c *countingWriter) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := c.ResponseWriter.(io.ReaderFrom); ok {
		n, err := rf.ReadFrom(r)
		c.n += n
		return n, err
	}
	n, err := io.Copy(struct{ io.Writer }{c.ResponseWriter}, r)
	c.n += n
	return n, err
}

// Handler serves the binary cache under /cache/ and accepts pushes.
type Handler struct {
	cfg       Config
	cacheInfo *prepared

	// encoded keeps the .narinfo text of records recently served. Records
	// are immutable (a new one is a new pointer), so the pointer is the
	// key; the map is dropped whole when it fills up.
	encMu   sync.Mutex
	encoded map[*pb.NarInfo]*prepared
}

// prepared is an answer ready to send: its body and the header values
// that go with it, shared by every response (net/http never modifies them).
type prepared struct {
	body                    []byte
	ctype, cc, etag, length []string // etag nil: none
}

func prepare(ctype, cc, etag string, body []byte) *prepared {
	p := &prepared{body: body, ctype: []string{ctype}, cc: []string{cc}, length: []string{strconv.Itoa(len(body))}}
	if etag != "" {
		p.etag = []string{etag}
	}
	return p
}

const maxEncoded = 16384

func (h *Handler) narInfoText(rec *pb.NarInfo) *prepared {
	h.encMu.Lock()
	e, ok := h.encoded[rec]
	h.encMu.Unlock()
	if ok {
		return e
	}
	e = prepare("text/x-nix-narinfo", ccRecord, `"`+rec.Blob[:32]+`"`, AppendNarInfo(make([]byte, 0, 512), rec))
	h.encMu.Lock()
	if len(h.encoded) >= maxEncoded {
		h.encoded = map[*pb.NarInfo]*prepared{}
	}
	h.encoded[rec] = e
	h.encMu.Unlock()
	return e
}

// Defaults for Config's size bounds.
const (
	DefaultMaxNarSize = 8 << 30
	DefaultMaxLogSize = 64 << 20
)

// NewHandler returns the cache handler.
func NewHandler(cfg Config) *Handler {
	if cfg.MaxNarSize <= 0 {
		cfg.MaxNarSize = DefaultMaxNarSize
	}
	if cfg.MaxLogSize <= 0 {
		cfg.MaxLogSize = DefaultMaxLogSize
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Priority == 0 {
		cfg.Priority = 30
	}
	if cfg.Metrics == nil {
		cfg.Metrics = noMetrics{}
	}
	info := fmt.Sprintf("StoreDir: %s\nWantMassQuery: 1\nPriority: %d\n", raftfsm.StoreDir, cfg.Priority)
	return &Handler{cfg: cfg, cacheInfo: prepare("text/x-nix-cache-info", ccRecord, "", []byte(info)), encoded: map[*pb.NarInfo]*prepared{}}
}

const (
	ccImmutable = "public, max-age=31536000, immutable"
	ccRecord    = "public, max-age=300"
	ccMiss      = "public, max-age=10"
)

// ServeHTTP routes /cache/<path>.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rest, ok := strings.CutPrefix(r.URL.Path, "/cache/")
	if !ok {
		h.fail(w, r, ErrNoRoute)
		return
	}
	rt, err := ParseRoute(rest)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		switch rt.Kind {
		case RouteCacheInfo:
			servePrepared(w, r, h.cacheInfo)
		case RouteNarInfo:
			h.serveNarInfo(w, r, rt.Key)
		case RouteNar:
			h.serveNar(w, r, rt.Key)
		case RouteLog:
			h.serveLog(w, r, rt.Key)
		}
	case http.MethodPut:
		if err := h.authorize(r); err != nil {
			h.fail(w, r, err)
			return
		}
		switch rt.Kind {
		case RouteNar:
			err = h.putNar(r, rt.Key)
		case RouteNarInfo:
			err = h.putNarInfo(r, rt.Key)
		case RouteLog:
			err = h.putLog(r, rt.Key)
		default:
			err = fmt.Errorf("%w: %s is served, not uploaded", raftfsm.ErrForbidden, rest)
		}
		if err != nil {
			h.fail(w, r, err)
			return
		}
		w.WriteHeader(http.StatusOK)
	default:
		w.Header().Set("Allow", "GET, HEAD, PUT")
		writeJSONError(w, http.StatusMethodNotAllowed, "method "+r.Method+" not allowed")
	}
}

func (h *Handler) authorize(r *http.Request) error {
	if h.cfg.Authorize == nil {
		return fmt.Errorf("%w: uploads are disabled", raftfsm.ErrForbidden)
	}
	return h.cfg.Authorize(r)
}

func (h *Handler) fail(w http.ResponseWriter, r *http.Request, err error) {
	status, _ := raftfsm.StatusOf(err)
	if status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Basic realm="kiln cache"`)
	}
	if status == http.StatusNotFound {
		w.Header().Set("Cache-Control", ccMiss)
	}
	if status >= 500 {
		h.cfg.Log.Error("cache request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	}
	writeJSONError(w, status, err.Error())
}

func writeJSONError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = w.Write(jsonErrorBody(msg))
}

// jsonErrorBody is the body of an error answer: {"error": msg} and a newline.
func jsonErrorBody(msg string) []byte {
	b, _ := json.Marshal(map[string]string{"error": msg})
	return append(b, '\n')
}

// servePrepared sends a prepared answer: 304 when the client has it (its
// ETag), no body for HEAD.
func servePrepared(w http.ResponseWriter, r *http.Request, p *prepared) {
	hd := w.Header()
	hd["Content-Type"] = p.ctype
	hd["Cache-Control"] = p.cc
	if p.etag != nil {
		hd["Etag"] = p.etag
		if inm := r.Header["If-None-Match"]; len(inm) > 0 && inm[0] == p.etag[0] {
			w.WriteHeader(http.StatusNotModified)
			return
		}
	}
	hd["Content-Length"] = p.length
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		_, _ = w.Write(p.body)
	}
}

func (h *Handler) serveNarInfo(w http.ResponseWriter, r *http.Request, hashPart string) {
	rec, err := h.cfg.Index().NarInfo(hashPart)
	h.cfg.Metrics.Request("narinfo", err == nil)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	servePrepared(w, r, h.narInfoText(rec))
}

func (h *Handler) serveNar(w http.ResponseWriter, r *http.Request, blob string) {
	f, _, err := h.cfg.Blobs.Open(blob)
	h.cfg.Metrics.Request("nar", err == nil)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	defer f.Close()
	hd := w.Header()
	hd["Content-Type"] = []string{"application/x-nix-nar"}
	hd["Cache-Control"] = []string{ccImmutable}
	hd["Etag"] = []string{`"` + blob + `"`}
	// ServeContent answers Range, If-Range and If-None-Match, and sends
	// the file with sendfile.
	cw := &countingWriter{ResponseWriter: w}
	http.ServeContent(cw, r, "", time.Time{}, f)
	h.cfg.Metrics.Served(cw.n)
}

func (h *Handler) serveLog(w http.ResponseWriter, r *http.Request, drv string) {
	rec, err := h.cfg.Index().Log(drv)
	h.cfg.Metrics.Request("log", err == nil)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	h.ServeLogRecord(w, r, rec)
}

// ServeLogRecord writes the text of one stored log (any attempt).
func (h *Handler) ServeLogRecord(w http.ResponseWriter, r *http.Request, rec *pb.LogRecord) {
	f, _, err := h.cfg.Blobs.Open(rec.Blob)
	if err != nil {
		h.fail(w, r, fmt.Errorf("%w: log of %s is not on this node yet", raftfsm.ErrUnavailable, rec.DrvPath))
		return
	}
	defer f.Close()
	hd := w.Header()
	hd["Content-Type"] = []string{"text/plain; charset=utf-8"}
	hd["Cache-Control"] = []string{ccRecord}
	hd["Etag"] = []string{`"` + rec.Blob + `"`}
	hd["Content-Length"] = []string{strconv.FormatUint(rec.Size, 10)}
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return
	}
	dec, err := zstd.NewReader(f, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true))
	if err != nil {
		return
	}
	defer dec.Close()
	_, _ = io.CopyN(w, dec, int64(rec.Size))
}

// putNar stores an uploaded compressed NAR under its file hash. It becomes
// part of the cache only when its narinfo is uploaded and verified.
func (h *Handler) putNar(r *http.Request, blob string) error {
	if r.ContentLength > h.cfg.MaxNarSize {
		return fmt.Errorf("%w: NAR file of %d bytes, limit %d", raftfsm.ErrTooLarge, r.ContentLength, h.cfg.MaxNarSize)
	}
	return h.cfg.Blobs.Put(r.Context(), blob, r.Body, h.cfg.MaxNarSize)
}

func (h *Handler) putNarInfo(r *http.Request, hashPart string) error {
	ni, err := ParseNarInfo(r.Body)
	if err != nil {
		return err
	}
	rec, err := ToRecord(ni)
	if err != nil {
		return err
	}
	if raftfsm.HashPart(rec.StorePath) != hashPart {
		return fmt.Errorf("%w: narinfo for %s uploaded as %s.narinfo", raftfsm.ErrInvalid, rec.StorePath, hashPart)
	}
	return h.IngestNarInfo(r.Context(), rec, 0)
}

// IngestNarInfo verifies a record against its blob (which must already be
// in the local store) and that its references are in the cache, signs it
// with the cluster key and publishes it. On any mismatch nothing is
// recorded.
func (h *Handler) IngestNarInfo(ctx context.Context, rec *pb.NarInfo, leaseID uint64) error {
	return h.ingest(ctx, rec, leaseID, nil)
}

// IngestPlacedNarInfo is IngestNarInfo for a NAR that was checked while it
// arrived (sum is what ReadNarZst found in it) and whose blob is already
// on a quorum of coordinators: the record must agree with sum, and the
// blob is neither read again nor copied.
func (h *Handler) IngestPlacedNarInfo(ctx context.Context, rec *pb.NarInfo, leaseID uint64, sum NarSummary) error {
	return h.ingest(ctx, rec, leaseID, &sum)
}

func (h *Handler) ingest(ctx context.Context, rec *pb.NarInfo, leaseID uint64, placed *NarSummary) error {
	if h.cfg.Signer == nil {
		return fmt.Errorf("%w: no cache key configured (--cache-key-file)", raftfsm.ErrUnavailable)
	}
	if err := raftfsm.ValidateNarInfo(rec); err != nil {
		return err
	}
	if int64(rec.FileSize) > h.cfg.MaxNarSize || int64(rec.NarSize) > h.cfg.MaxNarSize {
		return fmt.Errorf("%w: NAR of %d bytes, limit %d", raftfsm.ErrTooLarge, rec.NarSize, h.cfg.MaxNarSize)
	}
	idx := h.cfg.Index()
	self := raftfsm.HashPart(rec.StorePath)
	for _, ref := range rec.References {
		if rh := raftfsm.HashPart(ref); rh != self {
			if _, err := idx.NarInfo(rh); err != nil {
				return fmt.Errorf("%w: reference %s is not in the cache; push it first", raftfsm.ErrInvalid, ref)
			}
		}
	}
	f, size, err := h.cfg.Blobs.Open(rec.Blob)
	if errors.Is(err, ErrBlobNotFound) {
		return fmt.Errorf("%w: %s has not been uploaded to this node", raftfsm.ErrInvalid, rec.Url)
	}
	if err != nil {
		return err
	}
	defer f.Close()
	if uint64(size) != rec.FileSize {
		return fmt.Errorf("%w: FileSize %d, the uploaded file has %d bytes", raftfsm.ErrInvalid, rec.FileSize, size)
	}
	if placed != nil {
		if err := placed.check(rec); err != nil {
			return err
		}
	} else {
		// The NAR is checked while the blob is copied to the other
		// coordinators; the record is committed only when both succeed
		// (a copy of a NAR that fails the check is swept as
		// unreferenced).
		checked := make(chan error, 1)
		go func() { checked <- checkNar(&ctxReader{ctx: ctx, r: f}, rec) }()
		replErr := h.cfg.Publisher.ReplicateBlob(ctx, rec.Blob, int64(rec.FileSize))
		if err := <-checked; err != nil {
			return err
		}
		if replErr != nil {
			return replErr
		}
	}
	if err := h.cfg.Signer.SignRecord(rec); err != nil {
		return err
	}
	if err := h.cfg.Publisher.CommitNar(ctx, rec, leaseID); err != nil {
		return err
	}
	h.cfg.Metrics.Uploaded(int64(rec.FileSize))
	return nil
}

// checkNar reads a zstd NAR and checks it matches its record's NarHash and
// NarSize.
func checkNar(r io.Reader, rec *pb.NarInfo) error {
	sum, err := ReadNarZst(r, rec.NarSize)
	if errors.Is(err, raftfsm.ErrTooLarge) {
		// The bound was the record's own NarSize (already checked against
		// MaxNarSize): the narinfo is wrong, not the upload too large.
		return fmt.Errorf("%w: the uploaded NAR is larger than NarSize %d", raftfsm.ErrInvalid, rec.NarSize)
	}
	if err != nil {
		return err
	}
	return sum.check(rec)
}

// check tells whether a record's NarHash and NarSize are this NAR's.
func (s NarSummary) check(rec *pb.NarInfo) error {
	want, err := raftfsm.ValidNixHash("NarHash", rec.NarHash)
	if err != nil {
		return err
	}
	if !bytes.Equal(s.Hash[:], want) || s.Size != rec.NarSize {
		return fmt.Errorf("%w: NarHash/NarSize do not match the uploaded NAR (it has %d bytes)", raftfsm.ErrInvalid, s.Size)
	}
	return nil
}

// putLog stores an uploaded build log (plain text) zstd-compressed.
func (h *Handler) putLog(r *http.Request, drv string) error {
	if r.ContentLength > h.cfg.MaxLogSize {
		return fmt.Errorf("%w: log of %d bytes, limit %d", raftfsm.ErrTooLarge, r.ContentLength, h.cfg.MaxLogSize)
	}
	return h.IngestLog(r.Context(), &pb.LogRecord{DrvPath: drv}, r.Body)
}

// IngestLog compresses a log, stores it and publishes its record (rec
// names the derivation, attempt and completeness; blob and size are filled
// in here).
func (h *Handler) IngestLog(ctx context.Context, rec *pb.LogRecord, body io.Reader) error {
	if err := raftfsm.ValidDrvPath(rec.DrvPath); err != nil {
		return err
	}
	var buf bytes.Buffer
	enc, err := newZstdWriter(&buf)
	if err != nil {
		return err
	}
	n, err := io.Copy(enc, io.LimitReader(body, h.cfg.MaxLogSize+1))
	if err != nil {
		return err
	}
	if n > h.cfg.MaxLogSize {
		return fmt.Errorf("%w: log over %d bytes", raftfsm.ErrTooLarge, h.cfg.MaxLogSize)
	}
	if err := enc.Close(); err != nil {
		return err
	}
	sum := sha256.Sum256(buf.Bytes())
	blob := hex.EncodeToString(sum[:])
	if err := h.cfg.Blobs.Put(ctx, blob, bytes.NewReader(buf.Bytes()), int64(buf.Len())); err != nil {
		return err
	}
	rec.Blob, rec.Size = blob, uint64(n)
	return h.cfg.Publisher.PublishLog(ctx, rec)
}
