package coordinator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/kilnci/kiln/cache"
	"github.com/kilnci/kiln/raftfsm"
	"github.com/kilnci/kiln/web"
)

// A streamed upload is checked and copied to the other voters while it
// arrives, not after: each chunk, as it is received and stored, is also
// queued for the NAR check and for one copy per peer, each running in its
// own goroutine. The check is waited for (its queue is short and blocks
// the upload when full); a peer whose queue stays full for peerLag is
// dropped, and if too few streamed copies succeed the finished blob is
// pushed the usual way (ReplicateBlob).
const (
	checkQueue = 4 // chunks (of at most 1 MiB) queued for the NAR check
	peerQueue  = 8 // chunks queued for each peer's copy
	peerLag    = 250 * time.Millisecond
)

var errPeerDropped = errors.New("the peer fell behind the upload")

// chunkSink is one consumer's queue of an upload's chunks, read by the
// consumer's goroutine as one byte stream. Chunks are shared, not copied:
// nobody writes to them once received.
type chunkSink struct {
	ch       chan []byte
	stop     chan struct{} // closed by quit: the consumer reads no more
	end      error         // what Read returns after the last chunk; set before ch is closed
	buf      []byte
	endOnce  sync.Once
	quitOnce sync.Once
}

func newChunkSink(n int) *chunkSink {
	return &chunkSink{ch: make(chan []byte, n), stop: make(chan struct{})}
}

func (s *chunkSink) Read(p []byte) (int, error) {
	for len(s.buf) == 0 {
		b, ok := <-s.ch
		if !ok {
			return 0, s.end
		}
		s.buf = b
	}
	n := copy(p, s.buf)
	s.buf = s.buf[n:]
	return n, nil
}

// WriteTo writes the chunks to w as they come, whole (an HTTP body copy
// sends each as one piece, not 32 KiB at a time).
func (s *chunkSink) WriteTo(w io.Writer) (int64, error) {
	var n int64
	for {
		for len(s.buf) == 0 {
			b, ok := <-s.ch
			if !ok {
				if s.end == io.EOF {
					return n, nil
				}
				return n, s.end
			}
			s.buf = b
		}
		k, err := w.Write(s.buf)
		n += int64(k)
		s.buf = s.buf[k:]
		if err != nil {
			return n, err
		}
	}
}

// finish ends the stream: after what is queued, Read returns err (io.EOF
// for a complete upload).
func (s *chunkSink) finish(err error) {
	s.endOnce.Do(func() {
		s.end = err
		close(s.ch)
	})
}

// quit tells the sender the consumer stopped reading.
func (s *chunkSink) quit() { s.quitOnce.Do(func() { close(s.stop) }) }

// peerCopy is one peer's streamed copy of an upload.
type peerCopy struct {
	peer    blobPeer
	sink    *chunkSink
	cancel  context.CancelFunc
	dropped bool
}

type peerCopyResult struct {
	peer blobPeer
	err  error
}

type checkResult struct {
	sum cache.NarSummary
	err error
}

// uploadFanout feeds an upload's chunks to the NAR check and the peers.
type uploadFanout struct {
	c       *Coordinator
	lease   uint64
	check   *chunkSink
	checked chan checkResult
	peers   []*peerCopy
	results chan peerCopyResult
	need    int    // copies besides this node's that make a quorum
	unknown bool   // the peers were unknown: the blob is pushed afterwards
	blob    string // the upload's hash and size, set by complete before the streams end
	size    int64
	crc     uint32 // CRC-32C of the chunks sent to the peers, in their trailer
}

// startFanout starts the check and one copy per peer that has an address.
func (c *Coordinator) startFanout(lease uint64) *uploadFanout {
	f := &uploadFanout{c: c, lease: lease, check: newChunkSink(checkQueue), checked: make(chan checkResult, 1)}
	go func() {
		// Owned by the upload: receiveNar always finishes the sink and
		// waits for the result.
		defer f.check.quit()
		sum, err := cache.ReadNarZst(f.check, uint64(c.cfg.MaxNarSize))
		f.checked <- checkResult{sum, err}
	}()
	peers, need, err := c.blobPeers()
	if err != nil {
		c.log.Warn("upload: no streamed copies (peers unknown)", "lease", lease, "err", err)
		f.unknown = true
		return f
	}
	f.need = need
	if need <= 0 {
		return f
	}
	f.results = make(chan peerCopyResult, len(peers))
	for _, p := range peers {
		if p.addr == "" || !c.startBackground() {
			continue
		}
		ctx, cancel := context.WithCancel(c.bgCtx)
		pc := &peerCopy{peer: p, sink: newChunkSink(peerQueue), cancel: cancel}
		f.peers = append(f.peers, pc)
		go func() {
			defer c.bg.Done()
			defer cancel()
			defer pc.sink.quit()
			name, size, err := c.copyStreamToPeer(ctx, p, pc.sink, func() (string, string) { return f.blob, crcString(f.crc) })
			// Without an error the stream reached its end: complete had
			// set blob and size.
			if err == nil && (name != f.blob || size != f.size) {
				err = fmt.Errorf("the peer stored %s (%d bytes), not %s (%d bytes)", name, size, f.blob, f.size)
			}
			c.metrics.countBlobCopy("streamed", err)
			f.results <- peerCopyResult{peer: p, err: err}
		}()
	}
	return f
}

// send queues one chunk for every consumer still reading.
func (f *uploadFanout) send(ctx context.Context, b []byte) error {
	select {
	case f.check.ch <- b:
	case <-f.check.stop: // the check has its answer already
	case <-ctx.Done():
		return ctx.Err()
	}
	if len(f.peers) > 0 {
		// Once for every peer: each is sent these same bytes.
		f.crc = crc32.Update(f.crc, castagnoli, b)
	}
	for _, p := range f.peers {
		if p.dropped {
			continue
		}
		select {
		case p.sink.ch <- b:
			continue
		case <-p.sink.stop:
			p.dropped = true
			continue
		default:
		}
		t := time.NewTimer(peerLag)
		select {
		case p.sink.ch <- b:
		case <-p.sink.stop:
			p.dropped = true
		case <-t.C:
			f.c.log.Warn("upload: peer fell behind the streamed copy; it gets the blob afterwards", "lease", f.lease, "peer", p.peer.id)
			p.dropped = true
			p.sink.finish(errPeerDropped)
			p.cancel()
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
		t.Stop()
	}
	return nil
}

// complete ends every consumer's stream after the last chunk: the upload
// was stored here as blob (size bytes), the name its copies are sent under.
func (f *uploadFanout) complete(blob string, size int64) {
	f.blob, f.size = blob, size // read by the copies once their streams end
	f.finish(io.EOF)
}

// finish ends every consumer's stream with err (io.EOF: the upload is
// complete; see complete). Copies still running get BlobPushTimeout to
// finish.
func (f *uploadFanout) finish(err error) {
	f.check.finish(err)
	for _, p := range f.peers {
		p.sink.finish(err)
		if !errors.Is(err, io.EOF) {
			p.cancel()
		} else {
			time.AfterFunc(f.c.cfg.BlobPushTimeout, p.cancel)
		}
	}
}

// wait returns what the check found, once the blob complete named is
// also on a quorum: streamed copies first, then the usual push for
// whatever they did not cover.
func (f *uploadFanout) wait(ctx context.Context) (cache.NarSummary, error) {
	var res checkResult
	select {
	case res = <-f.checked:
	case <-ctx.Done():
		return cache.NarSummary{}, ctx.Err()
	}
	if res.err != nil {
		return cache.NarSummary{}, res.err
	}
	ok := 0
	for pending := len(f.peers); ok < f.need && pending > 0; pending-- {
		select {
		case r := <-f.results:
			if r.err != nil {
				f.c.log.Warn("upload: streamed copy to peer failed", "lease", f.lease, "peer", r.peer.id, "blob", f.blob, "err", r.err)
			} else {
				ok++
			}
		case <-ctx.Done():
			return cache.NarSummary{}, ctx.Err()
		}
	}
	if ok < f.need || f.unknown {
		// Every streamed copy has ended (none can race the push).
		if err := f.c.ReplicateBlob(ctx, f.blob, f.size); err != nil {
			return cache.NarSummary{}, err
		}
	}
	return res.sum, nil
}

// A streamed copy's name is not known until its end: it comes in an HTTP
// trailer, with the CRC-32C of the bytes sent (the sender's computed once
// for all its peers, as the chunks are queued). The peer checks the bytes
// against the CRC, not by hashing them again (the node that sends them
// hashed them as it stored them; a scrub re-hashes every blob).
const (
	blobNameTrailer = "Kiln-Blob"
	blobCRCTrailer  = "Kiln-Blob-Crc32c"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crcString(crc uint32) string { return fmt.Sprintf("%08x", crc) }

// trailedBody reads a streamed copy's body, and at its end (before
// returning io.EOF) sets the request's trailers to what end returns.
type trailedBody struct {
	r       io.Reader
	trailer http.Header
	end     func() (name, crc string)
}

func (b *trailedBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if err == io.EOF {
		b.setTrailers()
	}
	return n, err
}

// WriteTo copies the body to w with its reader's WriteTo (a chunkSink's:
// whole chunks) and sets the trailers at its end.
func (b *trailedBody) WriteTo(w io.Writer) (int64, error) {
	n, err := io.Copy(w, b.r)
	if err == nil {
		b.setTrailers()
	}
	return n, err
}

func (b *trailedBody) setTrailers() {
	name, crc := b.end()
	b.trailer.Set(blobNameTrailer, name)
	b.trailer.Set(blobCRCTrailer, crc)
}

// copyStreamToPeer sends body to a peer as a blob whose name and CRC-32C,
// which end gives once body has ended, go in trailers; the peer answers
// the name and size it stored.
func (c *Coordinator) copyStreamToPeer(ctx context.Context, p blobPeer, body io.Reader, end func() (name, crc string)) (string, int64, error) {
	tb := &trailedBody{r: body, trailer: http.Header{blobNameTrailer: nil, blobCRCTrailer: nil}, end: end}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+p.addr+"/internal/v1/blobs", tb)
	if err != nil {
		return "", 0, err
	}
	req.Trailer = tb.trailer
	req.Header.Set("Authorization", "Bearer "+c.cfg.AdminToken)
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := c.blobClient.Do(req)
	if err != nil {
		return "", 0, fmt.Errorf("%w: %v", raftfsm.ErrUnavailable, err)
	}
	defer resp.Body.Close()
	lr := io.LimitReader(resp.Body, 4<<10)
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(lr)
		return "", 0, fmt.Errorf("%w: peer %s answered %s: %s", raftfsm.ErrUnavailable, p.id, resp.Status, msg)
	}
	var stored storedBlob
	if err := json.NewDecoder(lr).Decode(&stored); err != nil {
		return "", 0, fmt.Errorf("%w: peer %s: %v", raftfsm.ErrUnavailable, p.id, err)
	}
	return stored.Name, stored.Size, nil
}

// storedBlob is the answer to a streamed blob copy.
type storedBlob struct {
	Name string `json:"name"`
	Size int64  `json:"size"`
}

// handleInternalBlobUpload takes a blob copy whose name the sender does not
// know until the end (an upload still arriving). With the name and CRC-32C
// in trailers (copyStreamToPeer), the bytes are checked against the CRC
// and stored under that name; without them, under their own hash. Either
// way, durably; the answer names the blob for the sender to compare.
func (c *Coordinator) handleInternalBlobUpload(w http.ResponseWriter, r *http.Request) {
	if err := c.clusterAuth(r); err != nil {
		web.WriteError(w, err)
		return
	}
	if err := c.blobCopyLength(r); err != nil {
		web.WriteError(w, err)
		return
	}
	var name string
	var n int64
	var err error
	if _, trailed := r.Trailer[blobNameTrailer]; trailed {
		crc := crc32.New(castagnoli)
		name, n, err = c.blobs.PutCopy(r.Context(), io.TeeReader(r.Body, crc), c.cfg.MaxNarSize, func() (string, error) {
			name, sum := r.Trailer.Get(blobNameTrailer), r.Trailer.Get(blobCRCTrailer)
			if name == "" || sum == "" {
				return "", fmt.Errorf("%w: the copy ended without its name and checksum", raftfsm.ErrInvalid)
			}
			if want := crcString(crc.Sum32()); sum != want {
				return "", fmt.Errorf("%w: the copy's CRC-32C is %s, the sender's %.20q", raftfsm.ErrInvalid, want, sum)
			}
			return name, nil
		})
	} else {
		name, n, err = c.blobs.PutHashed(r.Context(), r.Body, c.cfg.MaxNarSize)
	}
	if err != nil {
		web.WriteError(w, err)
		return
	}
	web.WriteJSON(w, http.StatusOK, storedBlob{Name: name, Size: n})
}
