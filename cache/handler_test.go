package cache_test

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
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/klauspost/compress/zstd"
	"github.com/nix-community/go-nix/pkg/nar"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"

	"github.com/kilnci/kiln/cache"
	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
	"github.com/kilnci/kiln/rpc"
)

const pushToken = "secret-token-123456"

// ---- NAR and narinfo fixtures ----

// narFixture is a NAR as `nix copy --to ...?compression=zstd` uploads it.
type narFixture struct {
	nar      []byte // the uncompressed NAR
	zst      []byte // the uploaded file
	fileHash string // sha256:<nixbase32> of zst
	narHash  string // sha256:<nixbase32> of nar
	fileB32  string // nixbase32 of the file digest: the name in the NAR URL
	blob     string // hex of the file digest: the blob store name
}

func (f narFixture) url() string { return "nar/" + f.fileB32 + ".nar.zst" }

func nixSHA256(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + nixbase32.EncodeToString(sum[:])
}

func zstdCompress(t testing.TB, b []byte) []byte {
	t.Helper()
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1))
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	return enc.EncodeAll(b, nil)
}

// writeNar builds a real NAR of a tree with a nested directory, an
// executable file, a plain file and a symlink. tag varies the contents so
// that distinct store paths have distinct NARs.
func writeNar(t testing.TB, tag string) []byte {
	t.Helper()
	script := "#!/bin/sh\necho hello from " + tag + "\n"
	readme := "This is " + tag + ".\n" + strings.Repeat("kiln ", 40) + "\n"
	entries := []struct {
		hdr  nar.Header
		body string
	}{
		{nar.Header{Path: "/", Type: nar.TypeDirectory}, ""},
		{nar.Header{Path: "/bin", Type: nar.TypeDirectory}, ""},
		{nar.Header{Path: "/bin/hello", Type: nar.TypeRegular, Executable: true, Size: int64(len(script))}, script},
		{nar.Header{Path: "/share", Type: nar.TypeDirectory}, ""},
		{nar.Header{Path: "/share/doc", Type: nar.TypeDirectory}, ""},
		{nar.Header{Path: "/share/doc/README", Type: nar.TypeRegular, Size: int64(len(readme))}, readme},
		{nar.Header{Path: "/share/hello-link", Type: nar.TypeSymlink, LinkTarget: "../bin/hello"}, ""},
	}
	var buf bytes.Buffer
	nw, err := nar.NewWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		hdr := e.hdr
		if err := nw.WriteHeader(&hdr); err != nil {
			t.Fatalf("nar header %s: %v", hdr.Path, err)
		}
		if e.body != "" {
			if _, err := io.WriteString(nw, e.body); err != nil {
				t.Fatalf("nar contents %s: %v", hdr.Path, err)
			}
		}
	}
	if err := nw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// fixtureOf compresses narBytes (which need not be a valid NAR) and
// computes the hashes a client would put in the narinfo.
func fixtureOf(t testing.TB, narBytes []byte) narFixture {
	t.Helper()
	zst := zstdCompress(t, narBytes)
	sum := sha256.Sum256(zst)
	return narFixture{
		nar:      narBytes,
		zst:      zst,
		fileHash: nixSHA256(zst),
		narHash:  nixSHA256(narBytes),
		fileB32:  nixbase32.EncodeToString(sum[:]),
		blob:     hex.EncodeToString(sum[:]),
	}
}

func buildNar(t testing.TB, tag string) narFixture {
	t.Helper()
	f := fixtureOf(t, writeNar(t, tag))
	// The fixture is itself checked by the code under test's reader: a
	// helper that built a bad NAR would make every test meaningless.
	sum, err := cache.ReadNarZst(bytes.NewReader(f.zst), 1<<20)
	if err != nil {
		t.Fatalf("fixture NAR does not read back: %v", err)
	}
	if got, want := "sha256:"+nixbase32.EncodeToString(sum.Hash[:]), f.narHash; got != want || sum.Size != uint64(len(f.nar)) {
		t.Fatalf("fixture NAR reads back as %s/%d, want %s/%d", got, sum.Size, want, len(f.nar))
	}
	return f
}

// storeBase is a valid store path basename "<32 nix-base32 chars>-name".
func storeBase(name string) string {
	sum := sha256.Sum256([]byte(name))
	return nixbase32.EncodeToString(sum[:20]) + "-" + name
}

func storePath(name string) string { return raftfsm.StoreDir + "/" + storeBase(name) }

// narInfoText is the narinfo a Nix client PUTs.
type narInfoText struct {
	StorePath   string
	URL         string
	Compression string
	FileHash    string
	FileSize    uint64
	NarHash     string
	NarSize     uint64
	References  []string // basenames
	Deriver     string   // basename
}

func narInfoFor(f narFixture, path string, refs ...string) narInfoText {
	return narInfoText{
		StorePath:   path,
		URL:         f.url(),
		Compression: "zstd",
		FileHash:    f.fileHash,
		FileSize:    uint64(len(f.zst)),
		NarHash:     f.narHash,
		NarSize:     uint64(len(f.nar)),
		References:  refs,
		// /nix/store/<hash>-<name> was built by <hash'>-<name>.drv
		Deriver: storeBase(path[len(raftfsm.StoreDir+"/")+33:] + ".drv"),
	}
}

func (n narInfoText) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "StorePath: %s\nURL: %s\nCompression: %s\n", n.StorePath, n.URL, n.Compression)
	fmt.Fprintf(&b, "FileHash: %s\nFileSize: %d\nNarHash: %s\nNarSize: %d\n", n.FileHash, n.FileSize, n.NarHash, n.NarSize)
	fmt.Fprintf(&b, "References: %s\n", strings.Join(n.References, " "))
	if n.Deriver != "" {
		fmt.Fprintf(&b, "Deriver: %s\n", n.Deriver)
	}
	return b.String()
}

func (n narInfoText) hashPart() string { return raftfsm.HashPart(n.StorePath) }

// ---- fakes ----

// fakeIndex is the replicated index, reduced to two maps. Its errors are
// those of raftfsm.Reader.
type fakeIndex struct {
	mu   sync.Mutex
	nars map[string]*pb.NarInfo
	logs map[string]*pb.LogRecord
	fail error // when set, every narinfo lookup fails with it
}

func newFakeIndex() *fakeIndex {
	return &fakeIndex{nars: map[string]*pb.NarInfo{}, logs: map[string]*pb.LogRecord{}}
}

func (x *fakeIndex) NarInfo(hashPart string) (*pb.NarInfo, error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.fail != nil {
		return nil, x.fail
	}
	n, ok := x.nars[hashPart]
	if !ok {
		return nil, fmt.Errorf("%w: no narinfo for %q", raftfsm.ErrNotFound, hashPart)
	}
	return proto.Clone(n).(*pb.NarInfo), nil
}

func (x *fakeIndex) Log(drvPath string) (*pb.LogRecord, error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	l, ok := x.logs[drvPath]
	if !ok {
		return nil, fmt.Errorf("%w: no log for %q", raftfsm.ErrNotFound, drvPath)
	}
	return proto.Clone(l).(*pb.LogRecord), nil
}

// keys lists what the index holds, to check that a refused push changed nothing.
func (x *fakeIndex) keys() []string {
	x.mu.Lock()
	defer x.mu.Unlock()
	ks := slices.Sorted(maps.Keys(x.nars))
	for _, k := range slices.Sorted(maps.Keys(x.logs)) {
		ks = append(ks, "log:"+k)
	}
	return ks
}

// fakePublisher commits records straight into the index, validating them
// as Apply does.
type fakePublisher struct {
	idx *fakeIndex
	mu  sync.Mutex
	nar []*pb.NarInfo
	log []*pb.LogRecord
	// replicated counts ReplicateBlob calls, which fail with replErr.
	replicated int
	replErr    error
}

func (p *fakePublisher) ReplicateBlob(context.Context, string, int64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.replicated++
	return p.replErr
}

func (p *fakePublisher) CommitNar(_ context.Context, rec *pb.NarInfo, _ uint64) error {
	if err := raftfsm.ValidateNarInfo(rec); err != nil {
		return err
	}
	p.mu.Lock()
	p.nar = append(p.nar, proto.Clone(rec).(*pb.NarInfo))
	p.mu.Unlock()
	p.idx.mu.Lock()
	defer p.idx.mu.Unlock()
	if _, ok := p.idx.nars[raftfsm.HashPart(rec.StorePath)]; !ok {
		p.idx.nars[raftfsm.HashPart(rec.StorePath)] = proto.Clone(rec).(*pb.NarInfo)
	}
	return nil
}

func (p *fakePublisher) PublishLog(_ context.Context, rec *pb.LogRecord) error {
	if err := raftfsm.ValidDrvPath(rec.DrvPath); err != nil {
		return err
	}
	p.mu.Lock()
	p.log = append(p.log, proto.Clone(rec).(*pb.LogRecord))
	p.mu.Unlock()
	p.idx.mu.Lock()
	defer p.idx.mu.Unlock()
	p.idx.logs[rec.DrvPath] = proto.Clone(rec).(*pb.LogRecord)
	return nil
}

func (p *fakePublisher) published() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.nar) + len(p.log)
}

// ---- the cache under test ----

type testCache struct {
	srv    *httptest.Server // narinfo GETs on the fast path, as on a coordinator
	plain  *httptest.Server // the same handler behind net/http alone
	handed atomic.Int64     // connections srv's fast path gave to net/http
	idx    *fakeIndex
	pub    *fakePublisher
	blobs  *cache.FSBlobStore
	base   string // parent of the blob root; holds the planted secret
	pubKey string
}

const plantedSecret = "TOP-SECRET-kiln-planted-outside-the-blob-root"

func newTestCache(t *testing.T) *testCache {
	t.Helper()
	base := t.TempDir()
	root := filepath.Join(base, "blobs")
	blobs, err := cache.NewFSBlobStore(root)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(base, "secret"), []byte(plantedSecret), 0o600); err != nil {
		t.Fatal(err)
	}
	keyDir := t.TempDir()
	pubKey, err := cache.WriteKeyFiles("kiln-test-1", filepath.Join(keyDir, "k.sec"), filepath.Join(keyDir, "k.pub"))
	if err != nil {
		t.Fatal(err)
	}
	signer, err := cache.LoadSigner(filepath.Join(keyDir, "k.sec"))
	if err != nil {
		t.Fatal(err)
	}
	idx := newFakeIndex()
	pub := &fakePublisher{idx: idx}
	h := cache.NewHandler(cache.Config{
		Index:     func() cache.Index { return idx },
		Blobs:     blobs,
		Signer:    signer,
		Publisher: pub,
		Authorize: rpc.RequireTokenOrBasic(pushToken),
		// Small bounds keep the oversize cases cheap.
		MaxNarSize: 1 << 20,
		MaxLogSize: 1 << 16,
	})
	// The handler is the server's whole handler: no ServeMux cleans
	// paths or redirects before it sees them. Narinfo GETs take the fast
	// path, as on a coordinator.
	c := &testCache{idx: idx, pub: pub, blobs: blobs, base: base, pubKey: pubKey}
	c.srv = httptest.NewUnstartedServer(h)
	c.srv.Listener = h.NewFastListener(c.srv.Listener, cache.FastOptions{})
	c.srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			c.handed.Add(1)
		}
	}
	c.srv.Start()
	t.Cleanup(c.srv.Close)
	c.plain = httptest.NewServer(h)
	t.Cleanup(c.plain.Close)
	return c
}

type reqOpt func(*http.Request)

func basicAuth(user, pass string) reqOpt {
	return func(r *http.Request) { r.SetBasicAuth(user, pass) }
}

var pushAuth = basicAuth("nix", pushToken)

func header(k, v string) reqOpt { return func(r *http.Request) { r.Header.Set(k, v) } }

// do sends one request to the cache and returns the response with its body read.
func (c *testCache) do(t *testing.T, method, path string, body []byte, opts ...reqOpt) (*http.Response, []byte) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, c.srv.URL+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range opts {
		o(req)
	}
	resp, err := c.srv.Client().Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading body: %v", method, path, err)
	}
	return resp, b
}

// mustStatus sends a request and fails the test unless it gets want.
func (c *testCache) mustStatus(t *testing.T, want int, method, path string, body []byte, opts ...reqOpt) []byte {
	t.Helper()
	resp, b := c.do(t, method, path, body, opts...)
	if resp.StatusCode != want {
		t.Fatalf("%s %s: status %d, want %d (body %q)", method, path, resp.StatusCode, want, b)
	}
	return b
}

// push uploads a NAR and then its narinfo, as `nix copy` does.
func (c *testCache) push(t *testing.T, f narFixture, ni narInfoText) {
	t.Helper()
	c.mustStatus(t, http.StatusOK, http.MethodPut, "/cache/"+f.url(), f.zst, pushAuth)
	c.mustStatus(t, http.StatusOK, http.MethodPut, "/cache/"+ni.hashPart()+".narinfo", []byte(ni.String()), pushAuth)
}

// ---- tests ----

func TestPushThenServeNarInfo(t *testing.T) {
	c := newTestCache(t)
	dep := buildNar(t, "libfoo")
	depInfo := narInfoFor(dep, storePath("libfoo-1.0"))
	c.push(t, dep, depInfo)

	f := buildNar(t, "hello")
	path := storePath("hello-2.12")
	// A self-reference and a reference to a path already in the cache.
	ni := narInfoFor(f, path, storeBase("hello-2.12"), storeBase("libfoo-1.0"))
	c.push(t, f, ni)

	resp, body := c.do(t, http.MethodGet, "/cache/"+ni.hashPart()+".narinfo", nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET narinfo: status %d, want 200 (body %q)", resp.StatusCode, body)
	}
	wantHeaders := map[string]string{
		"Content-Type":   "text/x-nix-narinfo",
		"Cache-Control":  "public, max-age=300",
		"ETag":           `"` + f.blob[:32] + `"`,
		"Content-Length": strconv.Itoa(len(body)),
	}
	for k, want := range wantHeaders {
		if got := resp.Header.Get(k); got != want {
			t.Errorf("GET narinfo: %s = %q, want %q", k, got, want)
		}
	}

	served, err := cache.ParseNarInfo(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("served narinfo does not parse: %v\n%s", err, body)
	}
	rec, err := cache.ToRecord(served)
	if err != nil {
		t.Fatalf("served narinfo is not a valid record: %v\n%s", err, body)
	}
	want := &pb.NarInfo{
		StorePath:   path,
		Url:         f.url(),
		Compression: "zstd",
		FileHash:    f.fileHash,
		FileSize:    uint64(len(f.zst)),
		NarHash:     f.narHash,
		NarSize:     uint64(len(f.nar)),
		References:  slices.Sorted(slices.Values([]string{storeBase("hello-2.12"), storeBase("libfoo-1.0")})),
		Deriver:     ni.Deriver,
		Blob:        f.blob,
	}
	if diff := cmp.Diff(want, rec, protocmp.Transform(), protocmp.IgnoreFields(&pb.NarInfo{}, "sigs")); diff != "" {
		t.Errorf("served narinfo (-want +got):\n%s", diff)
	}
	if len(served.Signatures) != 1 {
		t.Fatalf("served narinfo has %d signatures, want 1 (the cluster key's)", len(served.Signatures))
	}

	_, otherPub, err := cache.GenerateKey("kiln-other-1")
	if err != nil {
		t.Fatal(err)
	}
	sigCases := []struct {
		name string
		key  string
		want bool
	}{
		{"cluster key", c.pubKey, true},
		{"another key", otherPub, false},
	}
	for _, tt := range sigCases {
		got, err := cache.Verify(served, tt.key)
		if err != nil || got != tt.want {
			t.Errorf("Verify with %s = %v, %v; want %v, nil", tt.name, got, err, tt.want)
		}
	}

	condCases := []struct {
		name        string
		ifNoneMatch string
		wantStatus  int
		wantBody    []byte
	}{
		{"matching etag", `"` + f.blob[:32] + `"`, http.StatusNotModified, nil},
		{"other etag", `"` + dep.blob[:32] + `"`, http.StatusOK, body},
	}
	for _, tt := range condCases {
		resp, got := c.do(t, http.MethodGet, "/cache/"+ni.hashPart()+".narinfo", nil, header("If-None-Match", tt.ifNoneMatch))
		if resp.StatusCode != tt.wantStatus {
			t.Errorf("If-None-Match %s: status %d, want %d", tt.name, resp.StatusCode, tt.wantStatus)
		}
		if !bytes.Equal(got, tt.wantBody) {
			t.Errorf("If-None-Match %s: body %q, want %q", tt.name, got, tt.wantBody)
		}
	}
}

func TestServeNar(t *testing.T) {
	c := newTestCache(t)
	f := buildNar(t, "serve")
	c.push(t, f, narInfoFor(f, storePath("serve-1")))
	if len(f.zst) < 20 {
		t.Fatalf("fixture too small for the range case: %d bytes", len(f.zst))
	}
	etag := `"` + f.blob + `"`
	size := strconv.Itoa(len(f.zst))
	cases := []struct {
		name        string
		method      string
		opts        []reqOpt
		wantStatus  int
		wantBody    []byte
		wantHeaders map[string]string
	}{
		{
			name: "GET", method: http.MethodGet, wantStatus: http.StatusOK, wantBody: f.zst,
			wantHeaders: map[string]string{
				"Content-Type": "application/x-nix-nar", "Content-Length": size, "ETag": etag,
				"Cache-Control": "public, max-age=31536000, immutable",
			},
		},
		{
			name: "range", method: http.MethodGet, opts: []reqOpt{header("Range", "bytes=10-19")},
			wantStatus: http.StatusPartialContent, wantBody: f.zst[10:20],
			wantHeaders: map[string]string{"Content-Length": "10", "Content-Range": "bytes 10-19/" + size, "ETag": etag},
		},
		{
			name: "HEAD", method: http.MethodHead, wantStatus: http.StatusOK, wantBody: []byte{},
			wantHeaders: map[string]string{"Content-Type": "application/x-nix-nar", "Content-Length": size, "ETag": etag},
		},
		{
			name: "if-none-match", method: http.MethodGet, opts: []reqOpt{header("If-None-Match", etag)},
			wantStatus: http.StatusNotModified, wantBody: []byte{},
		},
	}
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			resp, body := c.do(t, tt.method, "/cache/"+f.url(), nil, tt.opts...)
			if resp.StatusCode != tt.wantStatus {
				t.Fatalf("status %d, want %d (body %q)", resp.StatusCode, tt.wantStatus, body)
			}
			if !bytes.Equal(body, tt.wantBody) {
				t.Errorf("body differs: got %d bytes, want %d", len(body), len(tt.wantBody))
			}
			for k, want := range tt.wantHeaders {
				if got := resp.Header.Get(k); got != want {
					t.Errorf("%s = %q, want %q", k, got, want)
				}
			}
		})
	}
}

func TestNixCacheInfo(t *testing.T) {
	c := newTestCache(t)
	cases := []struct {
		method   string
		wantBody string
	}{
		{http.MethodGet, "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n"},
		{http.MethodHead, ""},
	}
	for _, tt := range cases {
		resp, body := c.do(t, tt.method, "/cache/nix-cache-info", nil)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s nix-cache-info: status %d", tt.method, resp.StatusCode)
		}
		if got := string(body); got != tt.wantBody {
			t.Errorf("%s nix-cache-info: body %q, want %q", tt.method, got, tt.wantBody)
		}
		if got, want := resp.Header.Get("Content-Type"), "text/x-nix-cache-info"; got != want {
			t.Errorf("%s nix-cache-info: Content-Type %q, want %q", tt.method, got, want)
		}
	}
}

func TestPushAuthorization(t *testing.T) {
	f := buildNar(t, "auth")
	ni := narInfoFor(f, storePath("auth-1"))
	cases := []struct {
		name      string
		opts      []reqOpt
		want      int
		wantStore bool
	}{
		{"no credentials", nil, http.StatusUnauthorized, false},
		{"wrong password", []reqOpt{basicAuth("nix", "not-the-token")}, http.StatusForbidden, false},
		{"empty password", []reqOpt{basicAuth("nix", "")}, http.StatusForbidden, false},
		{"wrong bearer", []reqOpt{header("Authorization", "Bearer not-the-token")}, http.StatusForbidden, false},
		{"basic with the token", []reqOpt{basicAuth("anyone", pushToken)}, http.StatusOK, true},
		{"bearer token", []reqOpt{header("Authorization", "Bearer "+pushToken)}, http.StatusOK, true},
	}
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			c := newTestCache(t)
			for _, up := range []struct {
				path string
				body []byte
			}{
				{"/cache/" + f.url(), f.zst},
				{"/cache/" + ni.hashPart() + ".narinfo", []byte(ni.String())},
				{"/cache/log/" + ni.Deriver, []byte("a build log\n")},
			} {
				resp, body := c.do(t, http.MethodPut, up.path, up.body, tt.opts...)
				if resp.StatusCode != tt.want {
					t.Errorf("PUT %s: status %d, want %d (body %q)", up.path, resp.StatusCode, tt.want, body)
				}
				wantAuth := ""
				if tt.want == http.StatusUnauthorized {
					wantAuth = `Basic realm="kiln cache"`
				}
				if got := resp.Header.Get("WWW-Authenticate"); got != wantAuth {
					t.Errorf("PUT %s: WWW-Authenticate %q, want %q", up.path, got, wantAuth)
				}
			}
			if got := c.blobs.Has(f.blob); got != tt.wantStore {
				t.Errorf("blob stored = %v, want %v", got, tt.wantStore)
			}
			var wantKeys []string
			if tt.wantStore {
				wantKeys = []string{ni.hashPart(), "log:" + raftfsm.StoreDir + "/" + ni.Deriver}
			}
			if diff := cmp.Diff(wantKeys, c.idx.keys()); diff != "" {
				t.Errorf("index (-want +got):\n%s", diff)
			}
		})
	}
}

// step is one upload of a refused-push scenario.
type step struct {
	path string // under /cache/
	body []byte
	want int
}

func TestPushRefused(t *testing.T) {
	good := buildNar(t, "good")
	other := buildNar(t, "other")
	path := storePath("good-1")
	base := narInfoFor(good, path)
	narinfoPath := base.hashPart() + ".narinfo"
	putNar := step{good.url(), good.zst, http.StatusOK}
	putInfo := func(ni narInfoText) step { return step{narinfoPath, []byte(ni.String()), http.StatusBadRequest} }
	modified := func(fn func(*narInfoText)) narInfoText { n := base; fn(&n); return n }

	// A valid NAR followed by junk, compressed as one stream, uploaded
	// under its correct file hash, with narinfo hashes of the whole or of
	// the NAR part alone.
	trailing := fixtureOf(t, append(slices.Clone(good.nar), "trailing garbage"...))
	trailingInfo := func(narHash string, narSize int) narInfoText {
		n := narInfoFor(trailing, path)
		n.NarHash, n.NarSize = narHash, uint64(narSize)
		return n
	}
	// Truncated NARs, self-consistently hashed: cut at the last token
	// (the root's closing parenthesis) and inside a file's contents.
	truncEnd := fixtureOf(t, good.nar[:len(good.nar)-16])
	readmeAt := bytes.Index(good.nar, []byte("This is good."))
	if readmeAt < 0 {
		t.Fatal("fixture lacks its README")
	}
	truncMid := fixtureOf(t, good.nar[:readmeAt+5])
	notNar := fixtureOf(t, []byte("this is not a NAR at all, just text"))
	// A raw (uncompressed) NAR uploaded under its own hash, with a
	// narinfo claiming zstd.
	rawSum := sha256.Sum256(good.nar)
	rawB32 := nixbase32.EncodeToString(rawSum[:])
	rawInfo := modified(func(n *narInfoText) {
		n.URL, n.FileHash, n.FileSize = "nar/"+rawB32+".nar.zst", "sha256:"+rawB32, uint64(len(good.nar))
	})

	cases := []struct {
		name  string
		steps []step
		// blobs that must not be stored afterwards
		absent []string
	}{
		{"NarHash mismatch", []step{putNar, putInfo(modified(func(n *narInfoText) { n.NarHash = other.narHash }))}, nil},
		{"NarSize wrong", []step{putNar, putInfo(modified(func(n *narInfoText) { n.NarSize++ }))}, nil},
		{"NarSize short", []step{putNar, putInfo(modified(func(n *narInfoText) { n.NarSize -= 8 }))}, nil},
		{"FileSize wrong", []step{putNar, putInfo(modified(func(n *narInfoText) { n.FileSize++ }))}, nil},
		{"narinfo before its NAR", []step{putInfo(base)}, []string{good.blob}},
		{"reference not in the cache", []step{putNar, putInfo(modified(func(n *narInfoText) {
			n.References = []string{storeBase("never-pushed-1")}
		}))}, nil},
		{"uploaded under another hash", []step{putNar, {
			path: raftfsm.HashPart(storePath("someone-else")) + ".narinfo", body: []byte(base.String()), want: http.StatusBadRequest,
		}}, nil},
		{"compression xz", []step{putNar, putInfo(modified(func(n *narInfoText) { n.Compression = "xz" }))}, nil},
		{"URL not matching FileHash", []step{putNar, putInfo(modified(func(n *narInfoText) { n.URL = other.url() }))}, nil},
		{"FileHash of another file", []step{putNar, {other.url(), other.zst, http.StatusOK}, putInfo(modified(func(n *narInfoText) {
			n.FileHash, n.URL = other.fileHash, other.url()
		}))}, nil},
		{"NAR bytes not matching the URL", []step{{good.url(), other.zst, http.StatusBadRequest}, putInfo(base)}, []string{good.blob, other.blob}},
		{"trailing garbage, NarHash of everything", []step{
			{trailing.url(), trailing.zst, http.StatusOK},
			putInfo(trailingInfo(trailing.narHash, len(trailing.nar))),
		}, nil},
		{"trailing garbage, NarHash of the NAR", []step{
			{trailing.url(), trailing.zst, http.StatusOK},
			putInfo(trailingInfo(good.narHash, len(good.nar))),
		}, nil},
		{"truncated at the end", []step{
			{truncEnd.url(), truncEnd.zst, http.StatusOK},
			putInfo(narInfoFor(truncEnd, path)),
		}, nil},
		{"truncated in a file", []step{
			{truncMid.url(), truncMid.zst, http.StatusOK},
			putInfo(narInfoFor(truncMid, path)),
		}, nil},
		{"not a NAR", []step{
			{notNar.url(), notNar.zst, http.StatusOK},
			putInfo(narInfoFor(notNar, path)),
		}, nil},
		{"not zstd", []step{{rawInfo.URL, good.nar, http.StatusOK}, putInfo(rawInfo)}, nil},
		{"garbage narinfo", []step{putNar, {narinfoPath, []byte("StorePath: " + path + "\nthis is no narinfo\n"), http.StatusBadRequest}}, nil},
		{"narinfo with NUL", []step{putNar, {narinfoPath, []byte(base.String() + "System: x86_64-linux\x00\n"), http.StatusBadRequest}}, nil},
		{"PUT nix-cache-info", []step{{"nix-cache-info", []byte("StoreDir: /tmp\n"), http.StatusForbidden}}, nil},
	}
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			c := newTestCache(t)
			before := c.idx.keys()
			for _, s := range tt.steps {
				c.mustStatus(t, s.want, http.MethodPut, "/cache/"+s.path, s.body, pushAuth)
			}
			if n := c.pub.published(); n != 0 {
				t.Errorf("%d records published, want 0", n)
			}
			if diff := cmp.Diff(before, c.idx.keys()); diff != "" {
				t.Errorf("index changed (-before +after):\n%s", diff)
			}
			c.mustStatus(t, http.StatusNotFound, http.MethodGet, "/cache/"+narinfoPath, nil)
			for _, b := range tt.absent {
				if c.blobs.Has(b) {
					t.Errorf("blob %s is stored", b)
				}
			}
		})
	}
}

// A NAR is checked while its blob is replicated: nothing is committed
// unless both succeed, and a bad NAR is reported as such even when the
// replication failed too.
func TestPushNeedsCheckAndReplicas(t *testing.T) {
	good := buildNar(t, "good")
	for _, tc := range []struct {
		name   string
		badNar bool
		replOK bool
		want   int
	}{
		{"both succeed", false, true, http.StatusOK},
		{"replication fails", false, false, http.StatusServiceUnavailable},
		{"bad NAR, replication succeeds", true, true, http.StatusBadRequest},
		{"bad NAR, replication fails", true, false, http.StatusBadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newTestCache(t)
			if !tc.replOK {
				c.pub.replErr = fmt.Errorf("%w: no quorum for the blob", raftfsm.ErrUnavailable)
			}
			ni := narInfoFor(good, storePath("good-1"))
			if tc.badNar {
				ni.NarSize++
			}
			c.mustStatus(t, http.StatusOK, http.MethodPut, "/cache/"+good.url(), good.zst, pushAuth)
			c.mustStatus(t, tc.want, http.MethodPut, "/cache/"+ni.hashPart()+".narinfo", []byte(ni.String()), pushAuth)
			wantPublished := 0
			if tc.want == http.StatusOK {
				wantPublished = 1
			}
			c.pub.mu.Lock()
			replicated := c.pub.replicated
			c.pub.mu.Unlock()
			if n := c.pub.published(); n != wantPublished || replicated != 1 {
				t.Fatalf("%d records published after %d replications, want %d after 1", n, replicated, wantPublished)
			}
		})
	}
}

// parserGoroutines counts goroutines inside go-nix's NAR parser.
func parserGoroutines() int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return strings.Count(string(buf[:n]), "nar.(*Reader).parseNode")
		}
		buf = make([]byte, 2*len(buf))
	}
}

// A NAR refused while a file's contents are being read must not leave
// the parser's goroutine behind, blocked forever: every bad upload would
// leak one.
func TestReadNarLeavesNoParser(t *testing.T) {
	good := writeNar(t, "leak")
	readmeAt := bytes.Index(good, []byte("This is leak."))
	if readmeAt < 0 {
		t.Fatal("fixture lacks its README")
	}
	cases := []struct {
		name   string
		nar    []byte
		maxNar uint64
	}{
		{"cut inside a file", good[:readmeAt+5], 1 << 20},
		{"over the size bound inside a file", good, uint64(readmeAt + 5)},
		{"cut at the end", good[:len(good)-16], 1 << 20},
		{"trailing bytes", append(slices.Clone(good), 1, 2, 3), 1 << 20},
	}
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			before := parserGoroutines()
			_, err := cache.ReadNarZst(bytes.NewReader(zstdCompress(t, tt.nar)), tt.maxNar)
			if err == nil {
				t.Fatal("ReadNarZst accepted a bad NAR")
			}
			if !errors.Is(err, raftfsm.ErrInvalid) && !errors.Is(err, raftfsm.ErrTooLarge) {
				t.Errorf("error %v wraps neither ErrInvalid nor ErrTooLarge", err)
			}
			if after := parserGoroutines(); after != before {
				t.Errorf("%d NAR parser goroutines before, %d after", before, after)
			}
		})
	}
}

func TestLogs(t *testing.T) {
	c := newTestCache(t)
	cases := []struct {
		name string
		drv  string
		text string
	}{
		{"short", storeBase("hello-2.12.drv"), "building hello\nall good\n"},
		{"empty", storeBase("empty-1.drv"), ""},
		{"long", storeBase("big-1.drv"), strings.Repeat("make[2]: compiling thing.c\n", 1000)},
	}
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			c.mustStatus(t, http.StatusOK, http.MethodPut, "/cache/log/"+tt.drv, []byte(tt.text), pushAuth)
			resp, body := c.do(t, http.MethodGet, "/cache/log/"+tt.drv, nil)
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("GET log: status %d (body %q)", resp.StatusCode, body)
			}
			if got := string(body); got != tt.text {
				t.Errorf("GET log: body %q, want %q", got, tt.text)
			}
			if got, want := resp.Header.Get("Content-Type"), "text/plain; charset=utf-8"; got != want {
				t.Errorf("GET log: Content-Type %q, want %q", got, want)
			}
			if got, want := resp.Header.Get("Content-Length"), strconv.Itoa(len(tt.text)); got != want {
				t.Errorf("GET log: Content-Length %q, want %q", got, want)
			}
		})
	}
	// A log over the bound is refused.
	c.mustStatus(t, http.StatusRequestEntityTooLarge, http.MethodPut, "/cache/log/"+storeBase("huge-1.drv"),
		bytes.Repeat([]byte("x"), 1<<16+1), pushAuth)
	c.mustStatus(t, http.StatusNotFound, http.MethodGet, "/cache/log/"+storeBase("huge-1.drv"), nil)
}

func TestMissesAndMethods(t *testing.T) {
	c := newTestCache(t)
	unknown := buildNar(t, "unknown")
	cases := []struct {
		name        string
		method      string
		path        string
		want        int
		wantHeaders map[string]string
	}{
		{"unknown narinfo", http.MethodGet, "/cache/" + raftfsm.HashPart(storePath("nope-1")) + ".narinfo", http.StatusNotFound,
			map[string]string{"Cache-Control": "public, max-age=10"}},
		{"unknown nar", http.MethodGet, "/cache/" + unknown.url(), http.StatusNotFound,
			map[string]string{"Cache-Control": "public, max-age=10"}},
		{"unknown log", http.MethodGet, "/cache/log/" + storeBase("nope-1.drv"), http.StatusNotFound,
			map[string]string{"Cache-Control": "public, max-age=10"}},
		{"HEAD unknown narinfo", http.MethodHead, "/cache/" + raftfsm.HashPart(storePath("nope-1")) + ".narinfo", http.StatusNotFound, nil},
		{"outside /cache/", http.MethodGet, "/nix-cache-info", http.StatusNotFound, nil},
		{"DELETE narinfo", http.MethodDelete, "/cache/" + raftfsm.HashPart(storePath("nope-1")) + ".narinfo", http.StatusMethodNotAllowed,
			map[string]string{"Allow": "GET, HEAD, PUT"}},
		{"POST nar", http.MethodPost, "/cache/" + unknown.url(), http.StatusMethodNotAllowed,
			map[string]string{"Allow": "GET, HEAD, PUT"}},
	}
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			resp, body := c.do(t, tt.method, tt.path, nil)
			if resp.StatusCode != tt.want {
				t.Fatalf("status %d, want %d (body %q)", resp.StatusCode, tt.want, body)
			}
			for k, want := range tt.wantHeaders {
				if got := resp.Header.Get(k); got != want {
					t.Errorf("%s = %q, want %q", k, got, want)
				}
			}
		})
	}
}

// rawRequest sends a request line exactly as given, so that no client
// cleans or re-encodes the path, and returns the parsed response.
func rawRequest(t *testing.T, addr, method, target string, body []byte, auth bool) (int, []byte) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var req bytes.Buffer
	fmt.Fprintf(&req, "%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n", method, target)
	if auth {
		r := &http.Request{Header: http.Header{}}
		r.SetBasicAuth("nix", pushToken)
		fmt.Fprintf(&req, "Authorization: %s\r\n", r.Header.Get("Authorization"))
	}
	if body != nil {
		fmt.Fprintf(&req, "Content-Length: %d\r\n", len(body))
	}
	req.WriteString("\r\n")
	req.Write(body)
	if _, err := conn.Write(req.Bytes()); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: method})
	if err != nil {
		t.Fatalf("%s %q: %v", method, target, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %q: reading body: %v", method, target, err)
	}
	return resp.StatusCode, b
}

func TestTraversalCorpus(t *testing.T) {
	c := newTestCache(t)
	// Something real is in the cache, so that a traversal that resolved
	// to a blob would have something to serve.
	f := buildNar(t, "present")
	c.push(t, f, narInfoFor(f, storePath("present-1")))

	valid52 := f.fileB32
	corpus := []string{
		"/cache/../etc/passwd",
		"/cache/nar/../../etc/passwd",
		"/cache/%2e%2e/%2e%2e/etc/passwd",
		"/cache/nar/%2e%2e%2fblob.nar.zst",
		"/cache//etc/passwd",
		`/cache/nar/\..\x.nar.zst`,
		"/cache/nar/%5c..%5cx.nar.zst",
		"/cache/abc%00.narinfo",
		"/cache/" + strings.Repeat("eout", 8) + ".narinfo",
		"/cache/" + strings.Repeat("a", 600) + ".narinfo",
		"/cache/nar/" + valid52 + ".nar.xz",
		"/cache/log/../../x.drv",
		"/cache/log/%2fetc%2fpasswd",
		"/cache/../secret",
		"/cache/nar/../../secret",
		"/cache/nar/%2e%2e%2f%2e%2e%2fsecret",
		"/cache/nar/" + f.blob + ".nar.zst",
		"/cache/nar/" + f.blob[:2] + "/" + f.blob,
		"/cache/" + f.blob[:2] + "/" + f.blob,
		"/cache/nar/" + valid52 + ".nar.zst/../../../secret",
		"/cache/log/" + storeBase("x-1.drv") + "/../../secret",
		"/cache/log/..%2f..%2fsecret",
		"/cache/log/.." + strings.Repeat("a", 30) + "-x.drv",
		"/cache/" + strings.Repeat("a", 32) + ".narinfo/../../secret",
		"/cache/nix-cache-info/../secret",
	}
	for _, p := range corpus {
		t.Run(p[:min(len(p), 60)], func(t *testing.T) {
			for _, m := range []struct {
				method string
				body   []byte
				auth   bool
			}{
				{http.MethodGet, nil, false},
				{http.MethodHead, nil, false},
				{http.MethodPut, []byte(plantedSecret), true},
			} {
				status, body := rawRequest(t, c.srv.Listener.Addr().String(), m.method, p, m.body, m.auth)
				if status != http.StatusBadRequest && status != http.StatusNotFound {
					t.Errorf("%s %q: status %d, want 400 or 404 (body %q)", m.method, p, status, body)
				}
				// The answer is the handler's own (a JSON error), not
				// the HTTP server's refusal of a malformed request.
				var jerr struct{ Error string }
				if m.method != http.MethodHead && (json.Unmarshal(body, &jerr) != nil || jerr.Error == "") {
					t.Errorf("%s %q: body %q is not the handler's JSON error", m.method, p, body)
				}
				if bytes.Contains(body, []byte(plantedSecret)) {
					t.Errorf("%s %q: the planted secret is in the response", m.method, p)
				}
			}
			rel, err := url.PathUnescape(strings.TrimPrefix(p, "/cache/"))
			if err != nil {
				rel = strings.TrimPrefix(p, "/cache/")
			}
			rt, err := cache.ParseRoute(rel)
			if err == nil {
				t.Fatalf("ParseRoute(%q) = %+v, want an error", rel, rt)
			}
			if !errors.Is(err, raftfsm.ErrInvalid) && !errors.Is(err, raftfsm.ErrNotFound) {
				t.Errorf("ParseRoute(%q): %v wraps neither ErrInvalid nor ErrNotFound", rel, err)
			}
		})
	}

	// Nothing was written beside the blob root, and the secret is intact.
	entries, err := os.ReadDir(c.base)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if diff := cmp.Diff([]string{"blobs", "secret"}, names); diff != "" {
		t.Errorf("files beside the blob root (-want +got):\n%s", diff)
	}
	if got, err := os.ReadFile(filepath.Join(c.base, "secret")); err != nil || string(got) != plantedSecret {
		t.Errorf("planted secret now %q, %v", got, err)
	}
	if c.pub.published() != 1 {
		t.Errorf("%d records published, want 1 (the setup push)", c.pub.published())
	}
}
