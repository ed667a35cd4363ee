package cache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nix-community/go-nix/pkg/narinfo"

	"github.com/kilnci/kiln/raftfsm"
)

// SampleNarInfo is a real narinfo (exported for the external tests).
const SampleNarInfo = `StorePath: /nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432
URL: nar/1094wph9z4nwlgvsd53abfz8i117ykiv5dwnq9nnhz846s7xqd7d.nar.xz
Compression: xz
FileHash: sha256:1094wph9z4nwlgvsd53abfz8i117ykiv5dwnq9nnhz846s7xqd7d
FileSize: 114980
NarHash: sha256:0lxjvvpr59c2mdram7ympy5ay741f180kv3349hvfc3f8nrmbqf6
NarSize: 464152
References: 7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-glibc-2.27
Deriver: 10dx1q4ivjb115y3h90mipaaz533nr0d-net-tools-1.60_p20170221182432.drv
`

func TestKeysSignAndVerify(t *testing.T) {
	dir := t.TempDir()
	secretPath, publicPath := filepath.Join(dir, "k.sec"), filepath.Join(dir, "k.pub")
	pub, err := WriteKeyFiles("kiln-test-1", secretPath, publicPath)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(pub, "kiln-test-1:") {
		t.Fatalf("public key %q lacks its name", pub)
	}
	if _, err := WriteKeyFiles("kiln-test-1", secretPath, publicPath); err == nil {
		t.Fatal("existing key files were overwritten")
	}
	s, err := LoadSigner(secretPath)
	if err != nil {
		t.Fatal(err)
	}
	if s.PublicKey() != pub {
		t.Fatalf("signer's public key %q, file has %q", s.PublicKey(), pub)
	}
	ni, err := narinfo.Parse(strings.NewReader(SampleNarInfo))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Sign(ni); err != nil {
		t.Fatal(err)
	}
	_, otherPub, _ := GenerateKey("other-1")
	cases := []struct {
		name string
		keys []string
		want bool
	}{
		{"right key", []string{pub}, true},
		{"wrong key", []string{otherPub}, false},
		{"right among several", []string{otherPub, pub}, true},
	}
	for _, tt := range cases {
		ok, err := Verify(ni, tt.keys...)
		if err != nil || ok != tt.want {
			t.Errorf("%s: verify = %v, %v; want %v", tt.name, ok, err, tt.want)
		}
	}
	// A changed narinfo no longer verifies.
	ni.NarSize++
	if ok, _ := Verify(ni, pub); ok {
		t.Fatal("a modified narinfo still verifies")
	}
	// The signature survives a text round trip.
	ni.NarSize--
	back, err := narinfo.Parse(strings.NewReader(ni.String()))
	if err != nil {
		t.Fatal(err)
	}
	if ok, _ := Verify(back, pub); !ok {
		t.Fatal("signature lost in the text round trip")
	}
}

func TestLoadSignerRefusesReadableKey(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "k.sec")
	if _, err := WriteKeyFiles("k", p, filepath.Join(dir, "k.pub")); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadSigner(p); !errors.Is(err, ErrKeyPermissions) {
		t.Fatalf("LoadSigner of a world-readable key: %v, want ErrKeyPermissions", err)
	}
	bad := filepath.Join(dir, "bad.sec")
	os.WriteFile(bad, []byte("not-a-key"), 0o600)
	if _, err := LoadSigner(bad); err == nil {
		t.Fatal("LoadSigner accepted garbage")
	}
}

func sha(b []byte) string { h := sha256.Sum256(b); return hex.EncodeToString(h[:]) }

func TestFSBlobStore(t *testing.T) {
	root := t.TempDir()
	s, err := NewFSBlobStore(root)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	data := bytes.Repeat([]byte("kiln"), 1000)
	name := sha(data)
	if err := s.Put(ctx, name, bytes.NewReader(data), 1<<20); err != nil {
		t.Fatal(err)
	}
	f, size, err := s.Open(name)
	if err != nil || size != int64(len(data)) {
		t.Fatalf("open: %v size %d", err, size)
	}
	got, _ := io.ReadAll(f)
	f.Close()
	if !bytes.Equal(got, data) {
		t.Fatal("blob bytes differ")
	}
	// Refusals store nothing.
	other := []byte("other bytes")
	if err := s.Put(ctx, sha(data[:10]), bytes.NewReader(other), 1<<20); !errors.Is(err, ErrHashMismatch) {
		t.Fatalf("mismatch: %v", err)
	}
	if err := s.Put(ctx, sha(other), bytes.NewReader(other), 4); err == nil {
		t.Fatal("a blob over the limit was stored")
	}
	if s.Has(sha(other)) || s.Has(sha(data[:10])) {
		t.Fatal("a refused blob is present")
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if err := s.Put(cancelled, sha(other), bytes.NewReader(other), 1<<20); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled put: %v", err)
	}
	tmp, _ := os.ReadDir(filepath.Join(root, "tmp"))
	if len(tmp) != 0 {
		t.Fatalf("%d temp files left behind", len(tmp))
	}
	if err := s.Delete(name); err != nil || s.Has(name) {
		t.Fatalf("delete: %v", err)
	}
	if _, _, err := s.Open(name); !errors.Is(err, ErrBlobNotFound) {
		t.Fatalf("open deleted: %v", err)
	}
}

// PutHashed names a blob by its bytes: a new one is stored, one already
// held is kept (and no second copy made), refusals store nothing.
func TestFSBlobStorePutHashed(t *testing.T) {
	root := t.TempDir()
	s, err := NewFSBlobStore(root)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("streamed "), 1000)
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	for _, tc := range []struct {
		name    string
		ctx     context.Context
		limit   int64
		wantErr error
	}{
		{"new", context.Background(), 1 << 20, nil},
		{"already held", context.Background(), 1 << 20, nil},
		{"over the limit", context.Background(), int64(len(data)) - 1, raftfsm.ErrTooLarge},
		{"cancelled", cancelled, 1 << 20, context.Canceled},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, n, err := s.PutHashed(tc.ctx, bytes.NewReader(data), tc.limit)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("PutHashed = %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil || got != sha(data) || n != int64(len(data)) {
				t.Fatalf("PutHashed = %q, %d, %v; want %q, %d", got, n, err, sha(data), len(data))
			}
			f, size, err := s.Open(got)
			if err != nil || size != n {
				t.Fatalf("open: %v, size %d", err, size)
			}
			f.Close()
		})
	}
	tmp, _ := os.ReadDir(filepath.Join(root, "tmp"))
	if len(tmp) != 0 {
		t.Fatalf("%d temp files left behind", len(tmp))
	}
	var names []string
	_ = s.List(context.Background(), func(name string, _ time.Time) error { names = append(names, name); return nil })
	if diff := cmp.Diff([]string{sha(data)}, names); diff != "" {
		t.Fatalf("stored blobs (-want +got):\n%s", diff)
	}
}

func TestBlobNamesRefuseTraversal(t *testing.T) {
	s, err := NewFSBlobStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	corpus := []string{
		"", "..", "../etc/passwd", "%2e%2e", "/etc/passwd", "ab/../../x", "a\x00b",
		`..\..\x`, strings.Repeat("a", 65), strings.Repeat("a", 63), strings.Repeat("A", 64),
		strings.Repeat("g", 64), "../" + strings.Repeat("a", 61),
	}
	for _, name := range corpus {
		if ValidBlobName(name) {
			t.Errorf("%q accepted as a blob name", name)
		}
		if _, _, err := s.Open(name); !errors.Is(err, ErrBadBlobName) {
			t.Errorf("Open(%q): %v, want ErrBadBlobName", name, err)
		}
		if err := s.Put(context.Background(), name, strings.NewReader("x"), 10); !errors.Is(err, ErrBadBlobName) {
			t.Errorf("Put(%q): %v, want ErrBadBlobName", name, err)
		}
	}
}

func FuzzValidBlobName(f *testing.F) {
	f.Add("../x")
	f.Add(strings.Repeat("a", 64))
	f.Fuzz(func(t *testing.T, name string) {
		if ValidBlobName(name) && (strings.ContainsAny(name, "/\\.\x00") || len(name) != 64) {
			t.Fatalf("unsafe name %q accepted", name)
		}
	})
}
