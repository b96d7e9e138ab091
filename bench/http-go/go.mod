module httpbench

go 1.21
