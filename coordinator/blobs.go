package coordinator

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/go-memdb"
	"github.com/hashicorp/raft"

	"google.golang.org/protobuf/proto"

	"github.com/kilnci/kiln/cache"
	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
	"github.com/kilnci/kiln/rpc"
	"github.com/kilnci/kiln/web"
)

// localBlobs is the node's blob store with an in-memory set of the names it
// holds, so the sync loop and HEAD requests need no stat calls.
type localBlobs struct {
	cache.BlobStore
	mu   sync.RWMutex
	have map[string]bool
}

func openLocalBlobs(ctx context.Context, dir string) (*localBlobs, error) {
	fs, err := cache.NewFSBlobStore(dir)
	if err != nil {
		return nil, err
	}
	b := &localBlobs{BlobStore: fs, have: map[string]bool{}}
	err = fs.List(ctx, func(name string, _ time.Time) error {
		b.have[name] = true
		return nil
	})
	return b, err
}

func (b *localBlobs) Put(ctx context.Context, name string, r io.Reader, limit int64) error {
	if err := b.BlobStore.Put(ctx, name, r, limit); err != nil {
		return err
	}
	b.add(name)
	return nil
}

func (b *localBlobs) PutHashed(ctx context.Context, r io.Reader, limit int64) (string, int64, error) {
	return b.added(b.BlobStore.PutHashed(ctx, r, limit))
}

func (b *localBlobs) PutCopy(ctx context.Context, r io.Reader, limit int64, named func() (string, error)) (string, int64, error) {
	return b.added(b.BlobStore.PutCopy(ctx, r, limit, named))
}

// added notes a blob a put stored, unless it failed.
func (b *localBlobs) added(name string, n int64, err error) (string, int64, error) {
	if err != nil {
		return "", 0, err
	}
	b.add(name)
	return name, n, nil
}

func (b *localBlobs) add(name string) {
	b.mu.Lock()
	b.have[name] = true
	b.mu.Unlock()
}

func (b *localBlobs) Has(name string) bool {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.have[name]
}

func (b *localBlobs) Delete(name string) error {
	b.mu.Lock()
	delete(b.have, name)
	b.mu.Unlock()
	return b.BlobStore.Delete(name)
}

// cacheIndex adapts the replica to cache.Index.
type cacheIndex struct{ r *raftfsm.Reader }

func (i cacheIndex) NarInfo(h string) (*pb.NarInfo, error) { return i.r.NarInfo(h) }
func (i cacheIndex) Log(drv string) (*pb.LogRecord, error) { return i.r.Log(drv) }

// openCache prepares the blob store, the signing key and the cache handler.
func (c *Coordinator) openCache(ctx context.Context) error {
	blobs, err := openLocalBlobs(ctx, filepath.Join(c.cfg.DataDir, "blobs"))
	if err != nil {
		return fmt.Errorf("open blob store: %w", err)
	}
	c.blobs = blobs
	var signer *cache.Signer
	if c.cfg.CacheKeyFile != "" {
		if signer, err = cache.LoadSigner(c.cfg.CacheKeyFile); err != nil {
			return fmt.Errorf("cache key: %w", err)
		}
		c.cachePublicKey = signer.PublicKey()
	} else {
		c.log.Warn("no --cache-key-file: the binary cache accepts no uploads")
	}
	c.cacheHandler = cache.NewHandler(cache.Config{
		Index:      func() cache.Index { return cacheIndex{c.fsm.Read()} },
		Blobs:      c.blobs,
		Signer:     signer,
		Publisher:  c,
		Authorize:  c.pushAuth,
		MaxNarSize: c.cfg.MaxNarSize,
		MaxLogSize: c.cfg.MaxLogBytes,
		Log:        c.log,
		Metrics:    c.metrics,
	})
	return nil
}

// CachePublicKey is the key clients trust ("" without a cache key).
func (c *Coordinator) CachePublicKey() string { return c.cachePublicKey }

// CommitNar commits a NAR's record once its blob is on a quorum
// (cache.Handler replicates it first, while it checks the NAR).
func (c *Coordinator) CommitNar(ctx context.Context, rec *pb.NarInfo, leaseID uint64) error {
	return c.applyOne(ctx, pb.CommandType_COMMAND_TYPE_PUT_NAR_INFO, &pb.PutNarInfo{NarInfo: rec, LeaseId: leaseID})
}

// PublishLog makes a build log's blob durable on a quorum of coordinators,
// then commits its record.
func (c *Coordinator) PublishLog(ctx context.Context, rec *pb.LogRecord) error {
	if err := c.ReplicateBlob(ctx, rec.Blob, -1); err != nil {
		return err
	}
	return c.applyOne(ctx, pb.CommandType_COMMAND_TYPE_PUT_LOG, &pb.PutLog{Log: rec})
}

func (c *Coordinator) applyOne(ctx context.Context, t pb.CommandType, m proto.Message) error {
	cmd, err := raftfsm.NewCommand(t, m, 0)
	if err != nil {
		return err
	}
	res, err := c.Apply(ctx, cmd)
	if err != nil {
		return err
	}
	return res.Results[0].Err
}

// blobPeer is another voter's HTTP address.
type blobPeer struct{ id, addr string }

// blobPeers lists the other voters and how many copies besides this
// node's make a quorum.
func (c *Coordinator) blobPeers() ([]blobPeer, int, error) {
	f := c.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, 0, fmt.Errorf("%w: %v", raftfsm.ErrUnavailable, err)
	}
	r := c.fsm.Read()
	voters := 0
	var peers []blobPeer
	for _, s := range f.Configuration().Servers {
		if s.Suffrage != raft.Voter {
			continue
		}
		voters++
		if string(s.ID) == c.id {
			continue
		}
		p := blobPeer{id: string(s.ID)}
		if n, err := r.Node(string(s.ID)); err == nil {
			p.addr = n.HttpAddr
		}
		peers = append(peers, p)
	}
	need := voters/2 + 1 - 1 // this node holds one copy
	if voters == 0 {
		need = 0
	}
	return peers, need, nil
}

// ReplicateBlob copies a local blob to the other voters and returns once a
// quorum (counting this node) has it fsynced. Copies to the rest go on in
// the background; a peer that misses it fetches it later.
func (c *Coordinator) ReplicateBlob(ctx context.Context, blob string, size int64) error {
	if !c.blobs.Has(blob) {
		return fmt.Errorf("%w: blob %s is not on this node", raftfsm.ErrInvalid, blob)
	}
	peers, need, err := c.blobPeers()
	if err != nil || need <= 0 {
		return err
	}
	results := make(chan error, len(peers))
	timeout := c.cfg.BlobPushTimeout
	if size > 0 {
		timeout += time.Duration(size/(1<<20)) * time.Second // at least 1 MiB/s
	}
	for _, p := range peers {
		if !c.startBackground() {
			return fmt.Errorf("%w: shutting down", raftfsm.ErrUnavailable)
		}
		go func() {
			defer c.bg.Done()
			pctx, cancel := context.WithTimeout(c.bgCtx, timeout)
			defer cancel()
			err := c.pushBlob(pctx, p, blob)
			c.metrics.countBlobCopy("pushed", err)
			if err != nil {
				c.log.Warn("blob copy to peer failed", "blob", blob, "peer", p.id, "err", err)
			}
			results <- err
		}()
	}
	ok, failed := 0, 0
	for ok < need {
		select {
		case err := <-results:
			if err == nil {
				ok++
			} else if failed++; failed > len(peers)-need {
				return fmt.Errorf("%w: only %d of the %d coordinators needed hold blob %s", raftfsm.ErrUnavailable, ok+1, need+1, blob)
			}
		case <-ctx.Done():
			return fmt.Errorf("%w: waiting for blob copies: %v", raftfsm.ErrUnavailable, ctx.Err())
		}
	}
	return nil
}

// startBackground registers a background transfer unless shutting down.
func (c *Coordinator) startBackground() bool {
	c.bgMu.Lock()
	defer c.bgMu.Unlock()
	if c.bgCtx == nil || c.bgCtx.Err() != nil {
		return false
	}
	c.bg.Add(1)
	return true
}

func (c *Coordinator) blobURL(addr, blob string) string {
	return "http://" + addr + "/internal/v1/blobs/" + blob
}

// pushBlob sends a blob to a peer unless it already has it.
func (c *Coordinator) pushBlob(ctx context.Context, p blobPeer, blob string) error {
	if p.addr == "" {
		return fmt.Errorf("%w: no HTTP address known for %s", raftfsm.ErrUnavailable, p.id)
	}
	head, err := c.peerRequest(ctx, http.MethodHead, p.addr, blob, nil, 0)
	if err != nil {
		return err
	}
	head.Body.Close()
	if head.StatusCode == http.StatusOK {
		return nil
	}
	f, size, err := c.blobs.Open(blob)
	if err != nil {
		return err
	}
	defer f.Close()
	resp, err := c.peerRequest(ctx, http.MethodPut, p.addr, blob, f, size)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("%w: peer %s answered %s: %s", raftfsm.ErrUnavailable, p.id, resp.Status, msg)
	}
	return nil
}

func (c *Coordinator) peerRequest(ctx context.Context, method, addr, blob string, body io.Reader, size int64) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.blobURL(addr, blob), body)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.ContentLength = size
	}
	req.Header.Set("Authorization", "Bearer "+c.cfg.AdminToken)
	resp, err := c.blobClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", raftfsm.ErrUnavailable, err)
	}
	return resp, nil
}

// fetchBlob copies a blob from whichever peer has it.
func (c *Coordinator) fetchBlob(ctx context.Context, blob string) error {
	peers, _, err := c.blobPeers()
	if err != nil {
		return err
	}
	rand.Shuffle(len(peers), func(i, j int) { peers[i], peers[j] = peers[j], peers[i] })
	var errs []error
	for _, p := range peers {
		if p.addr == "" {
			continue
		}
		err := func() error {
			resp, err := c.peerRequest(ctx, http.MethodGet, p.addr, blob, nil, 0)
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("%w: %s answered %s", raftfsm.ErrNotFound, p.id, resp.Status)
			}
			return c.blobs.Put(ctx, blob, resp.Body, c.cfg.MaxNarSize)
		}()
		if err == nil {
			return nil
		}
		errs = append(errs, err)
	}
	return fmt.Errorf("%w: no peer gave blob %s: %v", raftfsm.ErrUnavailable, blob, errors.Join(errs...))
}

// handleInternalBlob serves and accepts blob copies between coordinators.
func (c *Coordinator) handleInternalBlob(w http.ResponseWriter, r *http.Request) {
	if err := c.clusterAuth(r); err != nil {
		web.WriteError(w, err)
		return
	}
	name := r.PathValue("name")
	if !cache.ValidBlobName(name) {
		web.WriteError(w, cache.ErrBadBlobName)
		return
	}
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		f, _, err := c.blobs.Open(name)
		if err != nil {
			web.WriteError(w, err)
			return
		}
		defer f.Close()
		w.Header().Set("Content-Type", "application/octet-stream")
		http.ServeContent(w, r, "", time.Time{}, f)
	case http.MethodPut:
		if err := c.blobCopyLength(r); err != nil {
			web.WriteError(w, err)
			return
		}
		if err := c.blobs.Put(r.Context(), name, r.Body, c.cfg.MaxNarSize); err != nil {
			web.WriteError(w, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	default:
		w.Header().Set("Allow", "GET, HEAD, PUT")
		web.WriteJSON(w, http.StatusMethodNotAllowed, map[string]string{"error": "method " + r.Method + " not allowed"})
	}
}

// blobCopyLength refuses a blob copy whose declared length is over the
// limit (the store still bounds what it reads).
func (c *Coordinator) blobCopyLength(r *http.Request) error {
	if r.ContentLength > c.cfg.MaxNarSize {
		return fmt.Errorf("%w: blob of %d bytes, limit %d", raftfsm.ErrTooLarge, r.ContentLength, c.cfg.MaxNarSize)
	}
	return nil
}

// clusterAuth checks the credential coordinators use with each other (the
// admin token until API keys exist).
func (c *Coordinator) clusterAuth(r *http.Request) error {
	return rpc.RequireToken(c.cfg.AdminToken)(r.Context(), r.URL.Path, r.Header)
}

// pushAuth checks the credential of a cache upload: the admin token as a
// bearer token or as the password of Basic auth (Nix's netrc).
func (c *Coordinator) pushAuth(r *http.Request) error {
	return rpc.RequireTokenOrBasic(c.cfg.AdminToken)(r)
}

// jitter returns d plus up to a quarter of d.
func jitter(d time.Duration) time.Duration {
	return d + time.Duration(rand.Int64N(int64(d)/4+1))
}

// runBlobSyncLoop fetches the blobs that committed records name and this
// node lacks (it was down, or not in the quorum that took the upload).
func (c *Coordinator) runBlobSyncLoop(ctx context.Context) {
	failures := 0
	for {
		ws := memdb.NewWatchSet()
		r := c.fsm.Read()
		ws.Add(r.Abandon())
		var missing []string
		err := r.EachBlob(ws, func(b string) bool {
			if !c.blobs.Has(b) {
				missing = append(missing, b)
			}
			return len(missing) < 1000
		})
		if err != nil {
			c.log.Error("listing blobs to sync", "err", err)
		}
		fetchFailed := false
		for _, b := range missing {
			if err := c.fetchBlob(ctx, b); err != nil {
				if ctx.Err() != nil {
					return
				}
				c.log.Warn("blob sync: fetch failed", "blob", b, "err", err)
				fetchFailed = true
				continue
			}
			c.log.Info("blob sync: fetched missing blob", "blob", b)
		}
		wait := jitter(c.cfg.BlobSyncInterval)
		if fetchFailed {
			failures++
			wait = min(wait, retryBackoff(failures+4))
		} else {
			failures = 0
		}
		wctx, cancel := context.WithTimeout(ctx, wait)
		_ = ws.WatchCtx(wctx)
		cancel()
		// Settle: records often arrive in bursts.
		if sleepCtx(ctx, 200*time.Millisecond) != nil {
			return
		}
	}
}

// ScrubReport is what one scrub found.
type ScrubReport struct {
	Started    time.Time `json:"started"`
	Finished   time.Time `json:"finished"`
	Checked    int       `json:"checked"`
	Corrupt    []string  `json:"corrupt"`
	Missing    []string  `json:"missing"`
	Repaired   []string  `json:"repaired"`
	Unrepaired []string  `json:"unrepaired"`
}

// Scrub re-hashes every local blob, drops corrupt ones, and fetches from
// peers whatever a record names and this node lacks.
func (c *Coordinator) Scrub(ctx context.Context) (*ScrubReport, error) {
	c.scrubMu.Lock()
	defer c.scrubMu.Unlock()
	rep := &ScrubReport{Started: time.Now().UTC(), Corrupt: []string{}, Missing: []string{}, Repaired: []string{}, Unrepaired: []string{}}
	var names []string
	if err := c.blobs.List(ctx, func(name string, _ time.Time) error {
		names = append(names, name)
		return nil
	}); err != nil {
		return nil, err
	}
	for _, name := range names {
		err := c.blobs.Verify(ctx, name)
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		rep.Checked++
		if errors.Is(err, cache.ErrHashMismatch) {
			c.log.Error("scrub: corrupt blob removed", "blob", name, "err", err)
			rep.Corrupt = append(rep.Corrupt, name)
			if derr := c.blobs.Delete(name); derr != nil {
				c.log.Error("scrub: removing corrupt blob", "blob", name, "err", derr)
			}
		} else if err != nil && !errors.Is(err, cache.ErrBlobNotFound) {
			c.log.Error("scrub: reading blob", "blob", name, "err", err)
		}
	}
	r := c.fsm.Read()
	var need []string
	if err := r.EachBlob(nil, func(b string) bool {
		if !c.blobs.Has(b) {
			need = append(need, b)
		}
		return true
	}); err != nil {
		return nil, err
	}
	for _, b := range need {
		if !contains(rep.Corrupt, b) {
			rep.Missing = append(rep.Missing, b)
			c.log.Error("scrub: blob missing", "blob", b)
		}
		if err := c.fetchBlob(ctx, b); err != nil {
			c.log.Error("scrub: repair failed", "blob", b, "err", err)
			rep.Unrepaired = append(rep.Unrepaired, b)
			continue
		}
		rep.Repaired = append(rep.Repaired, b)
	}
	rep.Finished = time.Now().UTC()
	c.lastScrub.Store(rep)
	c.log.Info("scrub finished", "checked", rep.Checked, "corrupt", len(rep.Corrupt), "missing", len(rep.Missing), "repaired", len(rep.Repaired), "unrepaired", len(rep.Unrepaired))
	return rep, nil
}

func contains(xs []string, x string) bool {
	for _, v := range xs {
		if v == x {
			return true
		}
	}
	return false
}

// runScrubLoop scrubs every CacheScrubInterval.
func (c *Coordinator) runScrubLoop(ctx context.Context) {
	for {
		if sleepCtx(ctx, jitter(c.cfg.CacheScrubInterval)) != nil {
			return
		}
		if _, err := c.Scrub(ctx); err != nil && ctx.Err() == nil {
			c.log.Error("scrub failed", "err", err)
		}
	}
}

// runBlobSweepLoop deletes local blobs that no record names and that are
// older than BlobOrphanGrace (uploads whose narinfo never came, records the
// GC dropped).
func (c *Coordinator) runBlobSweepLoop(ctx context.Context) {
	for {
		if sleepCtx(ctx, jitter(max(c.cfg.BlobOrphanGrace/4, time.Second))) != nil {
			return
		}
		cutoff := time.Now().Add(-c.cfg.BlobOrphanGrace)
		r := c.fsm.Read()
		var doomed []string
		err := c.blobs.List(ctx, func(name string, mod time.Time) error {
			if mod.After(cutoff) {
				return nil
			}
			used, err := r.BlobReferenced(name)
			if err == nil && !used {
				doomed = append(doomed, name)
			}
			return err
		})
		if err != nil {
			if ctx.Err() == nil {
				c.log.Error("blob sweep", "err", err)
			}
			continue
		}
		for _, name := range doomed {
			if err := c.blobs.Delete(name); err != nil {
				c.log.Warn("blob sweep: delete", "blob", name, "err", err)
				continue
			}
			c.log.Info("blob sweep: removed unreferenced blob", "blob", name)
		}
	}
}

// runCacheGCLoop (leader only) collects garbage every CacheGCInterval.
func (c *Coordinator) runCacheGCLoop(ctx context.Context) {
	for {
		if sleepCtx(ctx, jitter(c.cfg.CacheGCInterval)) != nil {
			return
		}
		if !c.IsLeader() {
			continue
		}
		total := 0
		for {
			const batch = 10000
			cmd, err := raftfsm.NewCommand(pb.CommandType_COMMAND_TYPE_COLLECT_GARBAGE, &pb.CollectGarbage{
				GraceSeconds: int64(c.cfg.CacheGCGrace / time.Second), MaxDeletes: batch,
			}, 0)
			if err != nil {
				c.log.Error("cache gc", "err", err)
				break
			}
			res, err := c.Apply(ctx, cmd)
			if err == nil {
				err = res.Results[0].Err
			}
			if err != nil {
				if ctx.Err() == nil {
					c.log.Warn("cache gc", "err", err)
				}
				break
			}
			total += int(res.Results[0].ID)
			if res.Results[0].ID < batch {
				break
			}
		}
		if total > 0 {
			c.log.Info("cache gc removed records", "count", total)
		}
	}
}

func (c *Coordinator) handleScrub(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodPost {
		if err := c.clusterAuth(r); err != nil {
			web.WriteError(w, err)
			return
		}
		rep, err := c.Scrub(r.Context())
		if err != nil {
			web.WriteError(w, err)
			return
		}
		web.WriteJSON(w, http.StatusOK, rep)
		return
	}
	rep := c.lastScrub.Load()
	if rep == nil {
		web.WriteError(w, fmt.Errorf("%w: no scrub has run on this node since it started", raftfsm.ErrNotFound))
		return
	}
	w.Header().Set("X-Kiln-Scrubbed", strconv.Itoa(rep.Checked))
	web.WriteJSON(w, http.StatusOK, rep)
}
