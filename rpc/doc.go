// Package rpc holds Kiln's Connect protocols: protos, generated code, auth interceptors and client helpers.
package rpc
