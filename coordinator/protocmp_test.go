package coordinator

import (
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/testing/protocmp"
)

func protocmpOpt() cmp.Option { return protocmp.Transform() }
