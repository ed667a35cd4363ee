package raftfsm

import "github.com/hashicorp/go-memdb"

// The step and build tables (steps.go, builds.go) are versions of
// copy-on-write B-trees, each held as the single row of a memdb table.

// tableRow is embedded in a version of the step or build table: the
// write transaction that may change it in place (nil once committed).
type tableRow struct{ owner *memdb.Txn }

// own makes txn the writer of v (the version embedding r) and stores v as
// table's single row. Once txn commits the version is published and
// nobody writes it again; reset then drops what only its writer used.
func (r *tableRow) own(txn *memdb.Txn, table string, v any, reset func()) error {
	r.owner = txn
	if err := txn.Insert(table, v); err != nil {
		return err
	}
	txn.Defer(func() {
		r.owner = nil
		reset()
	})
	return nil
}

// readRow returns the version of a B-tree table txn sees.
func readRow[T any](txn *memdb.Txn, table string) T {
	o, err := txn.First(table, "id")
	if err != nil {
		panic("raftfsm: " + table + " lookup: " + err.Error()) // only a schema mistake makes First fail
	}
	if o == nil {
		panic("raftfsm: state without " + table) // newState makes one
	}
	return o.(T)
}

// newState returns an empty state: memdb's tables and empty step and build tables.
func newState() (*memdb.MemDB, error) {
	db, err := memdb.NewMemDB(schema())
	if err != nil {
		return nil, err
	}
	txn := db.Txn(true)
	if err := newStepTable().own(txn); err != nil {
		txn.Abort()
		return nil, err
	}
	if err := newBuildTable().own(txn); err != nil {
		txn.Abort()
		return nil, err
	}
	txn.Commit()
	return db, nil
}
