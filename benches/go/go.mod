module pid-server-bench-go

go 1.19
