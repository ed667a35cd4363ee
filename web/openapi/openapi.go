// Package openapi embeds the API descriptions Kiln serves.
//
// hydra-api.yaml is a corrected copy of Hydra's own OpenAPI description (the
// corrections are listed in HYDRA-CORRECTIONS.md); kiln-api.yaml describes
// Kiln's own /api/v1. Tests check the real handlers' answers against them
// with package conformance, which keeps the OpenAPI library out of the binary.
package openapi

import (
	"bytes"
	_ "embed"
)

//go:embed hydra-api.yaml
var hydraYAML []byte

//go:embed kiln-api.yaml
var kilnYAML []byte

// HydraYAML returns a copy of the embedded (corrected) Hydra API description.
func HydraYAML() []byte { return bytes.Clone(hydraYAML) }

// KilnYAML returns a copy of the embedded Kiln API description.
func KilnYAML() []byte { return bytes.Clone(kilnYAML) }
