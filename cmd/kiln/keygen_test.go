package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kilnci/kiln/cache"
)

func TestKeygenWritesLoadableKeys(t *testing.T) {
	dir := t.TempDir()
	sec, pub := filepath.Join(dir, "c.sec"), filepath.Join(dir, "c.pub")
	root := newRootCmd()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetArgs([]string{"keygen", "cache.example-1", "--secret-file", sec, "--public-file", pub})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	s, err := cache.LoadSigner(sec)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(pub)
	if strings.TrimSpace(string(b)) != s.PublicKey() || !strings.Contains(out.String(), s.PublicKey()) {
		t.Fatalf("public file %q / output %q do not match the secret key's %q", b, out.String(), s.PublicKey())
	}
	root = newRootCmd()
	root.SetArgs([]string{"keygen", "cache.example-1", "--secret-file", sec, "--public-file", pub})
	if err := root.Execute(); err == nil {
		t.Fatal("keygen overwrote existing key files")
	}
}
