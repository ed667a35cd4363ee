// Package e2e holds end-to-end tests that run real kiln processes (and, where builds run, real Nix).
package e2e
