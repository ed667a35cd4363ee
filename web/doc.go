// Package web serves Kiln's REST API (Hydra-compatible paths and /api/v1) and its dashboard.
package web
